"""Output constraints on the local engine: the grammar a request asks for, checked off the event loop.

`output_grammar` reads the typed body's constraint (`response_format`,
`structured_outputs`, `guided_*`) and builds its grammar (engine/structured.py).
`check_grammar` compiles it on a small worker pool with the engine's limits and
a time bound, so a schema the compiler cannot enforce, or one too large, is a
400 that says why before the request reaches the engine, and no compile ever
runs on the API's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from inferd.engine.sampling_params import InvalidParameterError
from inferd.engine.structured import CHECK_TIMEOUT_S, check, grammar_for

_CHECKS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="inferd-grammar-check")


def output_grammar(body) -> tuple[str | None, str | None]:
    """(grammar, the parameter that asked for it), or (None, None) for an unconstrained request."""
    constraint = body.output_constraint()
    if constraint is None:
        return None, None
    kind, spec, param = constraint
    return grammar_for(kind, spec, param), param


async def check_grammar(grammar: str | None, param: str | None, timeout: float = CHECK_TIMEOUT_S) -> None:
    if grammar is None:
        return
    future = _CHECKS.submit(check, grammar, param)
    try:
        await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        raise InvalidParameterError(param, f"the grammar took longer than {timeout:g} s to compile; "
                                    "simplify the schema") from None
