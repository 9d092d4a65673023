"""A stream finished by a second deployment is priced part by part, each at its own deployment's price."""

from __future__ import annotations

import pytest

from inferd.gateway.router import BrokenPart, Route
from inferd.tenancy import quota
from inferd.tenancy.ledger import LedgerRow
from inferd.tenancy.metering import Metering, RequestMeter
from inferd.tenancy.prices import Price, PriceBook


def test_each_part_is_priced_at_its_deployment_and_the_row_names_the_finisher():
    prices = PriceBook({"primary": Price(input=1.0, output=10.0), "backup": Price(input=2.0, output=20.0)}, {})
    metering = Metering(store=None, prices=prices)
    row = LedgerRow(ts=0.0, endpoint="chat", status=0, request_id="r", stream=True)
    meter = RequestMeter(metering, quota.Ticket("", None, quota.Demand(0, 0.0), 0.0), row, prompt_estimate=0)
    route = Route("m", "chat", group="g", deployment="backup",
                  broken_parts=[BrokenPart("primary", completion_tokens=2, prompt_tokens=100)])
    # the usage the client got: both parts (the backup's prompt 102 with the prefill, 4 out)
    meter.chunk({"choices": [], "usage": {"prompt_tokens": 202, "completion_tokens": 6}})
    closed = meter.close(200, route)
    assert (closed.deployment, closed.prompt_tokens, closed.completion_tokens) == ("backup", 202, 6)
    primary = (100 * 1.0 + 2 * 10.0) / 1e6
    backup = (102 * 2.0 + 4 * 20.0) / 1e6
    assert closed.cost_usd == pytest.approx(primary + backup)
