"""Taking a request in: resolve its model, admit and meter it, start its route. One sequence for
every endpoint and for batch lines.

`admit` finds the model group the request names (a 404 if none), admits the
request against its caller's limits and starts its meter (`Metering.begin`, or
`begin_predictions` for a tensor model's infer call: a 429/402 here is a ledger
row too), and returns the `Admission` the caller then
hands to the gateway: the request, its meter and the `Route` that records what
the gateway decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.gateway.router import Gateway, Route
from inferd.tenancy.metering import Metering, RequestMeter
from inferd.wire.request import InferenceRequest


@dataclass
class Admission:
    request: InferenceRequest
    meter: RequestMeter
    route: Route


async def admit(gateway: Gateway, metering: Metering, request: InferenceRequest) -> Admission:
    group = gateway.resolve(request.model, request.endpoint)
    if request.endpoint.startswith("infer"):  # a tensor model's call (infer, infer@<version>): priced per row
        meter = await metering.begin_predictions(request.caller, group.name, request.model, request.request_id,
                                                 predictions=request.body.predictions, batch_id=request.batch_id)
    else:
        meter = await metering.begin(request, group.name)
    return Admission(request, meter, Route(request.model, request.endpoint))
