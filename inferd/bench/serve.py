"""`inferd bench serve`: online serving benchmark against any OpenAI-compatible server.

Sends `--num-prompts` streaming requests to `/v1/completions` or
`/v1/chat/completions` of a running server (inferd, llama.cpp's llama-server,
vLLM, ...) and measures, on the client, TTFT, TPOT, ITL and end-to-end latency
per request (definitions in `inferd.bench.metrics`). Requests go out all at once
under `--max-concurrency` (at most C in flight), or as a seeded Poisson process
of `--request-rate` requests/s (both can be combined).

Every request asks for exactly `--output-len` tokens: `max_tokens`, `ignore_eos:
true` (vLLM, inferd and llama-server all honour it; llama-server also reads
`max_tokens` as its `n_predict`) and greedy sampling. Output tokens are counted
from the server's `usage` (requested with `stream_options.include_usage`), else
with the tokenizer, else as text chunks.

Prompts are random English words (`inferd.bench.datasets`) cut to
`--input-len` tokens with `--tokenizer` (default: the embedded model's tokenizer,
when installed; `none` estimates the length). Without `--seed` each run draws a
new seed, so a server's prompt cache never holds a previous run's prompts. One
warm-up request (its own prompt, not timed) checks the setup first.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from inferd.bench.datasets import TextPrompt, random_text_prompts
from inferd.bench.metrics import RequestResult, compute_metrics, format_report, parse_goodput

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def load_tokenizer(spec: str | None):
    """'auto' -> the embedded model's tokenizer if installed, else None; 'none' -> None;
    a model directory or .gguf file -> its tokenizer."""
    if spec is None or spec.lower() == "none":
        return None
    from inferd.engine.tokenizer import Tokenizer
    from inferd.models.loader import load_checkpoint

    if spec == "auto":
        try:
            from inferd.models.default_model import default_model_path
            path = default_model_path()
        except FileNotFoundError:
            return None
    else:
        path = spec
    return Tokenizer(load_checkpoint(path, progress=False).tokenizer)


def build_payload(endpoint: str, model: str, prompt: str, output_len: int, ignore_eos: bool,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model, "max_tokens": output_len, "temperature": 0.0,
                               "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    if endpoint.endswith("/chat/completions"):
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    payload.update(extra or {})
    return payload


def chunk_text(obj: dict, chat: bool) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(client, url: str, payload: dict, headers: dict[str, str], prompt: TextPrompt,
                       tokenizer=None, t0: float = 0.0) -> RequestResult:
    """One streaming request; timings relative to its own send time."""
    chat = "messages" in payload
    r = RequestResult(prompt_len=prompt.num_tokens)
    pieces: list[str] = []
    usage: dict = {}
    chunks = 0
    st = time.perf_counter()
    r.start = st - t0
    last = st
    first = True
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {body[:500]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (pings), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ts = time.perf_counter()
                obj = json.loads(data)
                if obj.get("error"):
                    r.error = f"stream error: {json.dumps(obj['error'])[:500]}"
                    return r
                text = chunk_text(obj, chat)
                if text:
                    if first:
                        r.ttft = ts - st
                        first = False
                    else:
                        r.itl.append(ts - last)
                    last = ts
                    chunks += 1
                    pieces.append(text)
                if obj.get("usage"):
                    usage = obj["usage"]
        r.e2el = time.perf_counter() - st
    except Exception as e:  # noqa: BLE001 - any failure is one failed request, reported
        r.error = f"{type(e).__name__}: {e}"
        return r
    if first:
        r.ttft = r.e2el  # nothing streamed: the whole response was the "first token"
    r.generated_text = "".join(pieces)
    if usage.get("completion_tokens") is not None:
        r.output_tokens = int(usage["completion_tokens"])
    elif tokenizer is not None:
        r.output_tokens = len(tokenizer.encode(r.generated_text, add_special_tokens=False))
    else:
        r.output_tokens = chunks
    if usage.get("prompt_tokens") is not None:
        r.prompt_len = int(usage["prompt_tokens"])
    r.success = True
    return r


async def run_benchmark(*, base_url: str, endpoint: str, model: str, prompts: list[TextPrompt],
                        output_len: int, max_concurrency: int | None = None,
                        request_rate: float = float("inf"), seed: int = 0, ignore_eos: bool = True,
                        api_key: str | None = None, extra_body: dict | None = None, tokenizer=None,
                        warmup_prompt: TextPrompt | None = None, timeout_s: float = 600.0
                        ) -> tuple[list[RequestResult], float]:
    """Send every prompt; returns the per-request results and the wall time (s)."""
    import httpx

    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max_concurrency or len(prompts))
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False) as client:
        if warmup_prompt is not None:
            w = await send_request(client, url, build_payload(endpoint, model, warmup_prompt.text, min(
                output_len, 8), ignore_eos, extra_body), headers, warmup_prompt, tokenizer)
            if not w.success:
                raise RuntimeError(f"the warm-up request to {url} failed: {w.error}")

        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(seed)

        async def one(p: TextPrompt) -> RequestResult:
            payload = build_payload(endpoint, model, p.text, output_len, ignore_eos, extra_body)
            if sem is None:
                return await send_request(client, url, payload, headers, p, tokenizer, t0)
            async with sem:
                return await send_request(client, url, payload, headers, p, tokenizer, t0)

        t0 = time.perf_counter()
        tasks = []
        for i, p in enumerate(prompts):
            if i and request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
            tasks.append(asyncio.create_task(one(p)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return list(results), duration


def server_models(base_url: str, api_key: str | None) -> list[str]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10, trust_env=False)
    resp.raise_for_status()
    return [m["id"] for m in resp.json().get("data", [])]


def main(args: argparse.Namespace) -> int:
    if args.endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint: one of {', '.join(ENDPOINTS)}")
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be at least 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be positive (inf: all at once)")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    slos = parse_goodput(args.goodput)
    extra = json.loads(args.extra_body) if args.extra_body else None
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)

    model = args.model or (server_models(args.base_url, args.api_key) or [None])[0]
    if not model:
        raise ValueError("--model: not given, and the server lists no model")
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = random_text_prompts(args.num_prompts + 1, args.input_len, seed, tokenizer)
    warmup, prompts = prompts[0], prompts[1:]

    results, duration = asyncio.run(run_benchmark(
        base_url=args.base_url, endpoint=args.endpoint, model=model, prompts=prompts,
        output_len=args.output_len, max_concurrency=args.max_concurrency, request_rate=args.request_rate,
        seed=seed, ignore_eos=args.ignore_eos, api_key=args.api_key, extra_body=extra,
        tokenizer=tokenizer, warmup_prompt=warmup, timeout_s=args.timeout))
    percentiles = [float(p) for p in args.percentiles.split(",") if p.strip()]
    metrics = compute_metrics(results, duration, slos, percentiles)

    print(f"{args.base_url}{args.endpoint}  model={model}  prompts={args.num_prompts}  "
          f"input~{args.input_len}  output={args.output_len}  max_concurrency={args.max_concurrency}  "
          f"request_rate={args.request_rate}  seed={seed}")
    print(format_report(metrics))
    failed = [r for r in results if not r.success]
    for r in failed[:5]:
        print(f"failed request: {r.error}", file=sys.stderr)
    short = [r.output_tokens for r in results if r.success and r.output_tokens != args.output_len]
    if short:
        print(f"warning: {len(short)} requests did not produce {args.output_len} tokens "
              f"(e.g. {short[:5]}): the server may not honour ignore_eos", file=sys.stderr)

    if args.result_json:
        data = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "base_url": args.base_url, "endpoint": args.endpoint, "model": model,
            "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
            "max_concurrency": args.max_concurrency,
            "request_rate": None if args.request_rate == float("inf") else args.request_rate,
            "seed": seed, "ignore_eos": args.ignore_eos, "extra_body": extra,
            "tokenizer": args.tokenizer if tokenizer is not None else None,
            "prompt_len_measured": tokenizer is not None,
            "metrics": metrics,
            "requests": [r.to_dict(with_text=args.save_text) for r in results],
        }
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps(data, indent=1))
    return 1 if failed and len(failed) == len(results) else 0
