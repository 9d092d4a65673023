"""The int8 KV cache under 64 concurrent requests: requests held at once and output tok/s, against
the default KV cache with the same `--kv-cache-bytes`.

`inferd serve` on the embedded model (default dtype), a KV budget small enough that the default
cache cannot hold all 64 requests, once with the default KV cache and once with
`--kv-cache-dtype int8`, alternating over `--repeats`. 64 clients each send a ~150-token prompt
asking for 64 tokens (ignore_eos) and send the next when it is answered, until `--requests` are
done; `/metrics` is read every 0.1 s for the requests running at once. Writes
benchmarks/results/kv_cache_int8.json and a section of docs/benchmarks.md.

    python benchmarks/kv_cache_int8.py [--kv-cache-bytes 96MiB] [--requests 192] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, Server, loadavg, machine_info, save_json, write_doc_section  # noqa: E402

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, words: int = 110, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def drive(url: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    running: list[float] = []
    done = asyncio.Event()

    async def watch(client: httpx.AsyncClient):
        while not done.is_set():
            text = (await client.get(url + "/metrics")).text
            m = re.search(r"^inferd:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
            if m:
                running.append(float(m.group(1)))
            await asyncio.sleep(0.1)

    queue = list(texts)
    tokens = 0

    async def client_loop(client: httpx.AsyncClient):
        nonlocal tokens
        while queue:
            text = queue.pop()
            r = await client.post(url + "/v1/completions", json={
                "prompt": text, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        watcher = asyncio.create_task(watch(client))
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        done.set()
        await watcher
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tok_s": tokens / elapsed,
            "max_running": max(running, default=0), "median_running": statistics.median(running or [0])}


def serve(kv_dtype: str, args) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "inferd.cli", "--log-level", "warning", "serve", "--port", str(port),
           "--kv-cache-bytes", args.kv_cache_bytes, "--kv-cache-dtype", kv_dtype, "--max-num-seqs", "64",
           "--store", f"sqlite:///{tempfile.mkdtemp(prefix='bench-kv-')}/ledger.db"]
    srv = Server(f"inferd-kv-{kv_dtype}", cmd, port, env={"PYTHONPATH": str(ROOT)}).wait_ready()
    try:
        asyncio.run(drive(srv.url, prompts(8, seed=1), 8, 4))  # warm-up
        out = asyncio.run(drive(srv.url, prompts(args.requests), args.concurrency, args.max_tokens))
        return out
    finally:
        srv.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kv-cache-bytes", default="96MiB")
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args()
    machine = {**machine_info(), "load_before": loadavg()}
    runs: dict[str, list[dict]] = {"auto": [], "int8": []}
    for _ in range(args.repeats):
        for kv in runs:
            runs[kv].append(serve(kv, args))
            print(kv, runs[kv][-1], flush=True)
    machine["load_after"] = loadavg()
    save_json("kv_cache_int8", {"machine": machine, "args": vars(args), "runs": runs})

    def med(kv, key):
        return statistics.median(r[key] for r in runs[kv])

    def each(kv):
        return ", ".join(f"{r['output_tok_s']:.1f}" for r in runs[kv])

    rows = [f"| {name} | {args.kv_cache_bytes} | {med(kv, 'max_running'):.0f} | {med(kv, 'median_running'):.0f} | "
            f"{med(kv, 'output_tok_s'):.1f} | {each(kv)} |"
            for kv, name in (("auto", "default (the model's dtype)"), ("int8", "`--kv-cache-dtype int8`"))]
    ratio = med("int8", "output_tok_s") / med("auto", "output_tok_s")
    held = med("int8", "max_running") / max(1.0, med("auto", "max_running"))
    text = f"""## KV cache compression: int8 under 64 concurrent requests

`python benchmarks/kv_cache_int8.py --kv-cache-bytes {args.kv_cache_bytes} --requests {args.requests}` —
{machine['date']}, {machine['cpu']} ({machine['isa']}), {machine['cores']} cores, torch {machine['torch']};
1-minute load {machine['load_before'][0]:.2f} before, {machine['load_after'][0]:.2f} after (the machine is shared).
Embedded SmolLM2-135M-Instruct, default dtype, `--max-num-seqs 64`; {args.concurrency} clients, ~150-token
prompts, {args.max_tokens} output tokens each (ignore_eos), {args.requests} requests per run, medians of
{args.repeats} alternating runs. Requests running at once sampled from `/metrics` every 0.1 s.

| KV cache | --kv-cache-bytes | most requests running | median running | output tok/s | runs |
|---|---|---|---|---|---|
{chr(10).join(rows)}

int8 held {held:.2f}x the requests at once and gave {ratio:.2f}x the output tok/s. Accuracy: see
"Accuracy of lossy options" (perplexity with the int8 KV cache).
"""
    print(text)
    if not args.no_doc:
        write_doc_section("kv_cache_int8", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
