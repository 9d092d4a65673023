"""A grammar that compiles too long is refused, and never stalls the tokens of other requests."""

from __future__ import annotations

import json
import random
import string
import threading
import time

import httpx
from llguidance import LLMatcher

from inferd.engine.structured import grammar_for, limits
from tests.api.conftest import MODEL, ServerProc

TIMEOUT_S = 0.05


def _heavy_choice() -> tuple[list[str], float]:
    """A choice list whose grammar takes well over TIMEOUT_S to compile here, and that compile time."""
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(12)) for _ in range(70_000)]
    grammar = grammar_for("choice", words, "structured_outputs")
    started = time.perf_counter()
    assert LLMatcher.validate_grammar(grammar, None, limits=limits()) == ""
    return words, time.perf_counter() - started


def test_a_slow_grammar_is_a_400_and_other_streams_keep_their_pace(tiny_llama):
    words, compile_s = _heavy_choice()
    assert compile_s > 3 * TIMEOUT_S, "the grammar must compile slower than the bound for this test to mean anything"
    srv = ServerProc(tiny_llama, "--grammar-timeout", str(TIMEOUT_S)).wait_ready()
    try:
        arrivals: list[float] = []
        first_chunks = threading.Event()

        def stream() -> None:
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True,
                    "temperature": 0}
            with httpx.stream("POST", srv.url + "/v1/completions", headers=srv.headers, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                        arrivals.append(time.perf_counter())
                        if len(arrivals) == 20:
                            first_chunks.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunks.wait(30)
        sent = time.perf_counter()
        r = httpx.post(srv.url + "/v1/chat/completions", headers=srv.headers, timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "pick"}], "max_tokens": 1,
            "structured_outputs": {"choice": words}})
        answered = time.perf_counter()
        reader.join(60)
        assert r.status_code == 400 and "longer than" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "structured_outputs"
        during = [b - a for a, b in zip(arrivals, arrivals[1:]) if a >= sent and b <= answered + compile_s]
        before = sorted(b - a for a, b in zip(arrivals[:20], arrivals[1:20]))
        assert during, "the stream ended before the grammar was checked"
        # a compile on the event loop or the engine's step loop would show as one gap of about compile_s
        assert max(during) < compile_s / 2, (max(during), compile_s, before[len(before) // 2])
    finally:
        srv.stop()
