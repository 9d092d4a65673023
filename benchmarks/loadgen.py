"""Load generators for the HTTP benchmarks: a closed loop on asyncio streams, and `wrk`.

`run_load` is a minimal HTTP/1.1 keep-alive client, one connection per concurrent
worker, opened before the clock starts; it sees every response, so it measures
time to the first streamed event too. httpx's client tops out near 1,400
requests/s against a bare mock on a 2-core machine and falls to ~350 at 32
concurrent requests (its connection pool), which would measure the client rather
than the server. `run_wrk` drives the same closed loop with `wrk` (C, one thread,
`-c` connections), the load generator people compare HTTP servers with; a Lua
script counts non-200 answers and writes one response header's values to a file,
and wrk's own latency histogram gives the percentiles. Both return a `RunResult`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class RunResult:
    latencies: list[float] = field(default_factory=list)   # seconds, successful requests (run_load)
    ttfts: list[float] = field(default_factory=list)       # seconds to the first event (streams)
    overheads: list[float] = field(default_factory=list)   # the gateway's own header, ms
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    completed: int = 0                                     # successful requests
    percentiles_ms: dict[str, float] | None = None          # run_wrk: from wrk's histogram (all requests)


def chat_body(model: str, stream: bool, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "stream": stream,
                       "messages": [{"role": "user", "content": "Say the NATO alphabet."}]}).encode()


def build_request(port: int, body: bytes, api_key: str) -> bytes:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"authorization: Bearer {api_key}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body  # one write: the request never waits on Nagle's algorithm


async def _read_response(reader: asyncio.StreamReader, on_event) -> tuple[int, dict[str, str], bool]:
    """Status, lower-case headers, keep-alive; `on_event()` is called when the first body bytes arrive."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    keep_alive = headers.get("connection", "").lower() != "close"
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
        on_event()
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                    pass
                break
            chunk = await reader.readexactly(size + 2)
            if b"data:" in chunk:
                on_event()
    else:
        await reader.read()
        on_event()
        keep_alive = False
    return status, headers, keep_alive


async def run_load(port: int, body: bytes, api_key: str, concurrency: int, max_requests: int,
                   max_seconds: float, overhead_header: str | None) -> RunResult:
    """Closed loop: `concurrency` workers, each on its own keep-alive connection, one request at a time."""
    request = build_request(port, body, api_key)
    result = RunResult()
    issued = 0
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker(i: int) -> None:
        nonlocal issued
        reader, writer = conns[i]
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            first: list[float] = []
            try:
                writer.write(request)
                status, headers, keep_alive = await _read_response(
                    reader, lambda: first or first.append(time.perf_counter()))
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                status, headers, keep_alive = -1, {}, False
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{type(e).__name__}: {e}")
            t1 = time.perf_counter()
            if status == 200:
                result.latencies.append(t1 - t0)
                if first:
                    result.ttfts.append(first[0] - t0)
                if overhead_header and overhead_header in headers:
                    result.overheads.append(float(headers[overhead_header]))
            else:
                result.errors += 1
                if status != -1 and len(result.error_samples) < 5:
                    result.error_samples.append(f"HTTP {status}")
            if not keep_alive:
                writer.close()
                reader, writer = conns[i] = await asyncio.open_connection("127.0.0.1", port)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    result.completed = len(result.latencies)
    for _, writer in conns:
        writer.close()
    return result


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_API_KEY")
wrk.body = io.open(os.getenv("BENCH_BODY")):read("*a")
local header = os.getenv("BENCH_HEADER")
local out = nil
bad = 0
function init(args)
  if header ~= "" then out = io.open(os.getenv("BENCH_HEADER_FILE"), "w") end
end
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
  if out and headers[header] then out:write(headers[header], "\\n") end
end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function done(summary, latency, requests)
  local non200 = 0
  for _, t in ipairs(threads) do non200 = non200 + t:get("bad") end
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_us": %d, "non200": %d, "socket_errors": %d, '
    .. '"p50": %d, "p90": %d, "p99": %d, "max": %d}\\n', summary.requests, summary.duration, non200,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def run_wrk(port: int, body: bytes, api_key: str, concurrency: int, seconds: float,
            overhead_header: str | None, wrk: str = "wrk", path: str = "/v1/chat/completions") -> RunResult:
    """`wrk -t1 -c<concurrency>` for `seconds`, POSTing `body` to `path`: a closed loop in C."""
    with tempfile.TemporaryDirectory() as tmp:
        script, body_file, header_file = Path(tmp, "post.lua"), Path(tmp, "body.json"), Path(tmp, "header.txt")
        script.write_text(_WRK_SCRIPT)
        body_file.write_bytes(body)
        env = {"BENCH_API_KEY": api_key, "BENCH_BODY": str(body_file), "BENCH_HEADER": overhead_header or "",
               "BENCH_HEADER_FILE": str(header_file), "PATH": "/usr/bin:/bin"}
        out = subprocess.run([wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
                              "-s", str(script), f"http://127.0.0.1:{port}{path}"],
                             capture_output=True, text=True, env=env, timeout=seconds + 60, check=True)
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        overheads = [float(x) for x in header_file.read_text().split()] if header_file.exists() else []
    errors = summary["non200"] + summary["socket_errors"]
    result = RunResult(overheads=overheads, errors=errors, elapsed=summary["duration_us"] / 1e6,
                       completed=summary["requests"] - summary["non200"],
                       percentiles_ms={k: summary[k] / 1000 for k in ("p50", "p90", "p99", "max")})
    if errors:
        result.error_samples.append(f"wrk: {summary['non200']} non-200 answers, {summary['socket_errors']} "
                                    "socket errors")
    return result
