"""The Open Inference Protocol (KServe v2, Triton's HTTP API) for tensor models.

`GET /v2`, `/v2/health/live|ready` (public, like /health), `/v2/models/{name}[/versions/{v}]`
(metadata: inputs and outputs with name, datatype, shape), `.../ready`, `.../config` (Triton's
model config, so `tritonclient` can read the batcher's settings), and
`POST /v2/models/{name}[/versions/{v}]/infer`, so `tritonclient.http` works unchanged, binary
tensors included. An infer call is a request like any other on the platform: its key is checked
(api/auth.py), its team's limits admit it and it is one ledger row (endpoint `infer`, priced per
prediction), routed by the gateway to a deployment of the model (of that version, when the path
names one). Errors are the protocol's `{"error": "..."}` with the right status; a request that
does not fit the model gets a 400 naming the input.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from starlette.background import BackgroundTask
from starlette.responses import Response

from inferd import __version__
from inferd.api.body_limits import read_limited
from inferd.api.metered_calls import metered
from inferd.api.protocol import ServerState, json_response, principal, state
from inferd.classic.metrics import InferMetrics
from inferd.classic.tensors import TensorError, decode_request, encode_result
from inferd.gateway.router import Handle
from inferd.providers.onnx import OnnxDeployment
from inferd.tenancy.intake import admit
from inferd.wire.errors import client_error, http_error
from inferd.wire.request import InferenceRequest

router = APIRouter()
_HEADER_LENGTH = "Inference-Header-Content-Length"


def attach(app, st: ServerState) -> Callable[[Handle], None]:
    """Metrics for the tensor models of a started gateway, on the app's registry; returns what watches a
    deployment loaded later (a new model version)."""
    metrics = app.state.infer_metrics = InferMetrics(st.registry)

    def watch(h: Handle) -> None:
        if "infer" in h.deployment.endpoints:  # a tensor model (providers/onnx.py)
            h.deployment.on_batch = lambda record, name=h.deployment.model_name: metrics.batch(name, record)

    for h in st.gateway.handles():
        watch(h)
    return watch


def _error(exc: BaseException) -> Response:
    err = http_error(400, str(exc)) if isinstance(exc, TensorError) else client_error(exc)
    return json_response({"error": err.message}, status=err.status, headers=err.headers)


def _deployments(st: ServerState, name: str, version: str | None = None) -> list[OnnxDeployment]:
    """The tensor deployments of a model (of `version`, when given); InferdError if there are none."""
    group = st.gateway.resolve(name)
    found = [h.deployment for h in group.handles if "infer" in h.deployment.endpoints]
    if not found:
        raise http_error(400, f"'{name}' is not a tensor model; /v2 serves the models with provider: onnx")
    if version is not None:
        found = [d for d in found if d.version == version]
        if not found:
            raise http_error(404, f"model '{name}' has no version '{version}'")
    return found


def _header_length(request: Request) -> int | None:
    value = request.headers.get(_HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise TensorError(f"{_HEADER_LENGTH}: must be a number of bytes, got {value[:40]!r}")
    return int(value)


async def infer(request: Request):
    """POST /v2/models/{name}[/versions/{version}]/infer. A plain Starlette endpoint, not a FastAPI one:
    the hot path of a tensor model is a few hundred microseconds, and FastAPI's per-request
    dependency solving would be a third of it."""
    arrival = time.perf_counter()
    name, version = request.path_params["name"], request.path_params.get("version")
    st = state(request)
    status, model = 500, ""  # metrics are labelled with served models only, never a name a client made up
    try:
        model = _deployments(st, name, version)[0].model_name
        raw = await read_limited(request.stream(), st.body_limits.max_bytes)
        req = decode_request(raw, _header_length(request))
        typed = InferenceRequest("infer" if version is None else f"infer@{version}", req, {"model": name},
                                 request.state.request_id, principal(request), model=name)
        admission = await admit(st.gateway, st.metering, typed)
        meter, route = admission.meter, admission.route
        request.state.route = route
        work = st.gateway.request(typed, route)
        result = await metered(meter, route, work)
        meter.usage({"predictions": result.rows})
        body, header_length = encode_result(result)
        headers = route.headers()
        if header_length is not None:
            headers[_HEADER_LENGTH] = str(header_length)
        status = 200
        return Response(body, media_type="application/octet-stream" if header_length else "application/json",
                        headers=headers, background=BackgroundTask(meter.finish, 200, route))
    except Exception as e:  # noqa: BLE001 - every failure is the protocol's error body
        response = _error(e)
        status = response.status_code
        return response
    finally:
        request.app.state.infer_metrics.answered(model, status, time.perf_counter() - arrival)


# before the other /v2 routes: routes are matched in order, and infer calls are the hot path
router.add_route("/v2/models/{name}/infer", infer, methods=["POST"])
router.add_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])


async def infer_asgi(scope, receive, send) -> None:
    """`infer` as a plain ASGI app (it answers every error itself)."""
    response = await infer(Request(scope, receive, send))
    await response(scope, receive, send)


@router.get("/v2")
async def server_metadata():
    return json_response({"name": "inferd", "version": __version__, "extensions": ["binary_tensor_data"]})


@router.get("/v2/health/live")
async def live():
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(request: Request):
    ok = all(h.deployment.healthy for h in state(request).gateway.serving_handles())
    return Response(status_code=200 if ok else 503)


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None):
    try:
        ok = any(d.healthy for d in _deployments(state(request), name, version))
    except Exception as e:  # noqa: BLE001 - an unknown model is not ready, and says why
        return _error(e)
    return Response(status_code=200 if ok else 400)


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(name: str, request: Request, version: str | None = None):
    try:
        found = _deployments(state(request), name, version)
    except Exception as e:  # noqa: BLE001
        return _error(e)
    sig = found[0].signature
    return json_response({"name": found[0].model_name, "versions": sorted({d.version for d in found}),
                          "platform": found[0].platform, "inputs": [s.metadata() for s in sig.inputs],
                          "outputs": [s.metadata() for s in sig.outputs]})


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def model_config(name: str, request: Request, version: str | None = None):
    try:
        d = _deployments(state(request), name, version)[0]
    except Exception as e:  # noqa: BLE001
        return _error(e)
    batching = d.batcher.max_batch_size > 0

    def dims(specs):  # Triton's dims leave out the batch dimension of a batching model
        return [{"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape[1:] if batching else s.shape)}
                for s in specs]

    config = {"name": d.model_name, "platform": d.platform, "max_batch_size": d.batcher.max_batch_size,
              "input": dims(d.signature.inputs), "output": dims(d.signature.outputs)}
    if batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": round(d.max_queue_delay_s * 1e6)}
    return json_response(config)
