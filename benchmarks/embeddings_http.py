"""Embeddings over HTTP under 32 concurrent clients: inferd's /v1/embeddings vs a plain
sentence-transformers server (benchmarks/peers/st_server.py), same model, same machine.

inferd runs `inferd serve --config` with only the bundled all-MiniLM-L6-v2 (its
embedding process batches concurrent requests dynamically); the peer encodes each
request as it arrives. Both use 2 torch threads. A load generator (asyncio + httpx,
in this process) keeps `--concurrency` requests of one text each in flight until
`--requests` are done; runs alternate between the servers (`--repeats`), and the
table reports the median run: embeddings/s and latency percentiles.

    python benchmarks/embeddings_http.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import ROOT, machine_info, save_json, write_doc_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "all-MiniLM-L6-v2"


def start(cmd: list[str], url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up")


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "the a of cache model server token batch latency request vector search index query result".split()
    return [" ".join(rng.choices(words, k=rng.randint(4, 60))) for _ in range(n)]


async def load(url: str, inputs: list[str], concurrency: int) -> dict:
    latencies: list[float] = []
    queue = list(reversed(inputs))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            text = queue.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/embeddings", json={"model": MODEL, "input": text})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return {"embeddings_per_s": len(inputs) / wall, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=640)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="inferd-embed-bench-"))
    config = tmp / "inferd.yaml"
    config.write_text(f"models:\n  - name: {MODEL}\n    deployments:\n      - {{provider: local, task: embed}}\n")
    servers = {
        "inferd": ([sys.executable, "-m", "inferd.cli", "--log-level", "warning", "serve", "--config", str(config),
                    "--port", "8310", "--num-threads", "2"], "http://127.0.0.1:8310"),
        "sentence-transformers (FastAPI)": ([sys.executable, "benchmarks/peers/st_server.py", "--port", "8311",
                                             "--threads", "2"], "http://127.0.0.1:8311"),
    }
    procs = []
    try:
        for i, (name, (cmd, url)) in enumerate(servers.items()):
            procs.append(start(cmd, url, tmp / f"server{i}.log"))
        inputs = texts(args.requests, seed=0)
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for name, (_, url) in servers.items():  # warm-up
            asyncio.run(load(url, inputs[:64], args.concurrency))
        for rep in range(args.repeats):
            for name, (_, url) in servers.items():
                runs[name].append(asyncio.run(load(url, texts(args.requests, seed=rep + 1), args.concurrency)))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    results = {}
    for name, rs in runs.items():
        best = sorted(rs, key=lambda r: r["embeddings_per_s"])[len(rs) // 2]
        results[name] = {**best, "all_runs_per_s": [round(r["embeddings_per_s"], 1) for r in rs]}
        print(f"{name:34s} {best['embeddings_per_s']:7.1f} emb/s  p50 {best['p50_ms']:7.1f} ms  "
              f"p99 {best['p99_ms']:7.1f} ms  runs {results[name]['all_runs_per_s']}")
    data = {"machine": machine_info(), "load_1min": os.getloadavg()[0], "args": vars(args), "results": results}
    save_json("embeddings_http", data)
    _doc(data)


def _doc(data: dict) -> None:
    a = data["args"]
    rows = "\n".join(f"| {name} | {r['embeddings_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{', '.join(map(str, r['all_runs_per_s']))} |" for name, r in data["results"].items())
    names = list(data["results"])
    ratio = data["results"][names[0]]["embeddings_per_s"] / data["results"][names[1]]["embeddings_per_s"]
    m = data["machine"]
    write_doc_section("embeddings-http", f"""## Embeddings over HTTP, {a['concurrency']} concurrent clients

`python benchmarks/embeddings_http.py` — {m['date']}, {m['cpu']}, {m['cores']} cores (the servers and
the load generator share them; 1-minute load at the end {data['load_1min']:.2f}), torch {m['torch']},
all-MiniLM-L6-v2 fp32, 2 torch threads per server. {a['requests']} requests of one text each
(4-60 words), {a['concurrency']} in flight; median of {a['repeats']} alternating runs.

| server | embeddings/s | p50 latency (ms) | p99 latency (ms) | runs (emb/s) |
|---|---|---|---|---|
{rows}

inferd's embedding process batches whatever requests are pending (waiting at most 2 ms for
more), so {a['concurrency']} concurrent one-text requests run as a few forward passes instead of
{a['concurrency']} separate ones: {ratio:.2f}x the peer's throughput, which encodes each request as it
arrives.
""")


if __name__ == "__main__":
    main()
