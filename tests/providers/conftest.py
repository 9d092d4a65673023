"""One mock upstream per test module, with faults and records cleared before each test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from inferd.providers.base import Deployment, Timeouts
from inferd.wire.errors import InferdError
from tests.gateway.mock_upstream import MockUpstream
from tests.typed import typed

T = TypeVar("T")
UPSTREAM_MODEL = "upstream-model"
# small enough that every timeout test ends in well under a second
FAST = Timeouts(connect=0.5, first_token=0.3, total=3.0, stream_silence=0.3)


@pytest.fixture(scope="module")
def mock_server():
    with MockUpstream(model=UPSTREAM_MODEL) as mock:
        yield mock


@pytest.fixture
def mock(mock_server):
    mock_server.clear_faults()
    mock_server.reset_requests()
    mock_server.api_key = None
    mock_server.honour_include_usage = True
    yield mock_server
    mock_server.clear_faults()


def run(make: Callable[[], Deployment], call: Callable[[Deployment], Awaitable[T]]) -> T:
    """`call(deployment)` on a fresh event loop, with a deployment built and closed on it."""
    async def main() -> T:
        deployment = make()
        try:
            return await call(deployment)
        finally:
            await deployment.aclose()
    return asyncio.run(main())


def fails(make: Callable[[], Deployment], call: Callable[[Deployment], Awaitable[object]]
          ) -> tuple[InferdError, float]:
    """The `InferdError` the call raises and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(InferdError) as info:
        run(make, call)
    return info.value, time.monotonic() - start


async def collect(deployment: Deployment, endpoint: str, body: dict, into: list | None = None) -> list[dict]:
    """Every chunk of a stream; `into` keeps those that arrived before a failure."""
    chunks = [] if into is None else into
    async for chunk in deployment.stream(typed(endpoint, body)):
        chunks.append(chunk)
    return chunks
