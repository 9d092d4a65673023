"""Running the engine streams of one API request: all first outputs, all finals, or merged.

`first_outputs` waits for the first output of every stream, so admission errors
surface before a response starts; `final_outputs` runs them to the end; `merge`
interleaves several prompts' streams as one. Any failure or cancellation closes
every stream, which aborts the requests in the engine core and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

from inferd.engine.outputs import RequestOutput

Stream = AsyncIterator[RequestOutput]


async def close_all(streams: list[Stream]) -> None:
    for s in streams:
        await s.aclose()


async def first_outputs(streams: list[Stream]) -> list[RequestOutput]:
    """The first output of every stream; on any error all streams are closed (aborted)."""
    try:
        return list(await gather_or_cancel([s.__anext__() for s in streams]))
    except BaseException:
        await close_all(streams)
        raise


async def final_outputs(streams: list[Stream]) -> list[RequestOutput]:
    async def last(s: Stream) -> RequestOutput:
        out = None
        async for out in s:
            pass
        return out

    try:
        return list(await gather_or_cancel([last(s) for s in streams]))
    finally:
        await close_all(streams)


async def gather_or_cancel(aws: list[Awaitable]) -> list:
    """Like gather, but the first failure cancels the rest."""
    if len(aws) == 1:
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge(streams: list[Stream], firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams, each starting with its first output."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in streams[i]:
                queue.put_nowait((i, out, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, e))
        queue.put_nowait((i, None, None))

    tasks: list[asyncio.Task] = []
    try:
        for i, out in enumerate(firsts):
            yield i, out
        live = [i for i, out in enumerate(firsts) if not out.finished]
        if len(live) == 1:  # the common case: no tasks, no queue
            async for out in streams[live[0]]:
                yield live[0], out
            return
        tasks = [asyncio.create_task(pump(i)) for i in live]
        remaining = len(live)
        while remaining:
            i, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)
