"""Gateway overhead: inferd's gateway vs LiteLLM's proxy in front of the same mock upstream.

What it measures: the cost of putting a gateway between a client and an
OpenAI-compatible upstream. The mock upstream of the tests
(`tests/gateway/mock_upstream.py`: deterministic 16-word answers, a fixed
latency before every answer) runs as one process per latency case (default
0 ms and 50 ms).
In front of the mocks, on loopback, with one worker each:

- `inferd serve --config <yaml>`: one model group per mock, one `provider: openai`
  deployment each (`base_url: http://127.0.0.1:PORT/v1`), `--api-key`;
- `litellm --config <yaml> --num_workers 1`: one `openai/` model per mock
  (`api_base`), a `master_key` (the proxy refuses to start without one).

Both gateways check an API key, neither logs each request (inferd
`--log-level warning`, LiteLLM `LITELLM_LOG=WARNING`), and each uses the HTTP
stack it installs by default (inferd: uvicorn with httptools on uvloop, aiohttp to the upstream;
LiteLLM: uvicorn on uvloop, its own upstream client).

For each latency case, concurrency (1, 8, 32, 128) and target (the mock directly
— the baseline —, inferd, LiteLLM), a closed loop sends non-streamed chat
completions (16 output words) for `--max-seconds` (4): `wrk -t1 -c<concurrency>`
where wrk is installed (`--load-generator wrk`, the default), otherwise the
asyncio closed loop of benchmarks/loadgen.py (until `--requests` or the time
limit); a streamed case (latency 0) always uses the latter, which times the
first event. Targets are interleaved, their order rotated on every one of the
`--repeats` (3), to cancel drift.

Reported per target and concurrency: requests/s (median over repeats), median
and P99 latency (wrk: the median of its percentiles over the repeats; the asyncio
loop: all repeats pooled), the median added latency (gateway median
- direct-to-mock median in the same case), the gateway's own overhead header
(inferd `x-inferd-overhead-ms`: time in inferd outside upstream calls; LiteLLM
`x-litellm-overhead-duration-ms`) and the gateway's CPU time per request (its
process tree, from /proc). Writes benchmarks/results/gateway_overhead.json,
benchmarks/results/gateway_overhead.png and the `gateway_overhead` section of
docs/benchmarks.md.

LiteLLM is not a dependency of inferd; install its proxy into a separate venv,
which keeps its ~50 extra packages out of inferd's environment:

    python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
    python benchmarks/gateway_overhead.py --litellm /tmp/litellm-venv/bin/litellm

It runs offline: `LITELLM_LOCAL_MODEL_COST_MAP=True` makes the proxy use its
bundled model cost map instead of fetching it (without it, startup waits on
three failed fetches before falling back to the same bundled copy). The script
waits (up to `--load-wait` seconds) for the 1-minute load average to fall
below `--max-load` before it starts, records the load before and after, and
measures a run again when other processes took more than `--max-foreign` (10%)
of the CPU during it (test suites share this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks import common  # noqa: E402
from benchmarks.common import RESULTS, ROOT, loadavg, machine_info, save_json, write_doc_section  # noqa: E402
from benchmarks.loadgen import RunResult, chat_body, run_load, run_wrk  # noqa: E402


API_KEY = "sk-bench-gateway-overhead-0123456789abcdef"  # long enough for LiteLLM's master-key check
TARGETS = ("direct", "inferd", "litellm")
LABELS = {"direct": "direct to mock", "inferd": "inferd", "litellm": "LiteLLM"}
COLORS = {"direct": "#888", "inferd": "#2a7", "litellm": "#36c"}
OVERHEAD_HEADERS = {"inferd": "x-inferd-overhead-ms", "litellm": "x-litellm-overhead-duration-ms"}
MAX_TOKENS = 16


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def wait_for_quiet(max_load: float, max_wait: float) -> list[float]:
    """Poll until the 1-minute load average is below `max_load` (other test suites share the machine)."""
    deadline = time.monotonic() + max_wait
    load = loadavg()
    while load and load[0] > max_load and time.monotonic() < deadline:
        print(f"load average {load}: waiting for it to fall below {max_load}", flush=True)
        time.sleep(15)
        load = loadavg()
    return load


# --- processes --------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (children that exited included)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        f = stats.get(p)
        if f is not None:  # utime stime cutime cstime are fields 14-17 of stat, 12-15 here
            total += sum(int(x) for x in f[11:15]) / tick
        todo.extend(children.get(p, []))
    return total


def _busy_seconds() -> float:
    """User and system CPU time of all processes since boot (interrupts left out: loopback traffic is ours)."""
    user, nice, system = (int(x) for x in open("/proc/stat").readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def _own_seconds(procs: list[Server]) -> float:
    """CPU time of this process, of the load generators it ran (wrk) and of the servers it started."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(p.cpu_seconds() for p in procs)


class Server(common.Server):
    """A benchmarked server process, with the CPU time its process tree used."""

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.proc.pid)


def model_name(latency_ms: float) -> str:
    return f"mock-{latency_ms:g}ms"


def start_mock(latency_ms: float) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.gateway.mock_upstream", "--port", str(port),
           "--latency", str(latency_ms / 1000)]
    return Server(f"mock-{latency_ms:g}ms", cmd, port, health="/v1/models").wait_ready()


def start_inferd(mocks: dict[float, Server], tmp: Path) -> Server:
    config = {"models": [{"name": model_name(lat), "deployments": [
        {"provider": "openai", "base_url": f"{m.url}/v1", "model": "mock-model"}]} for lat, m in mocks.items()]}
    path = tmp / "inferd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    cmd = [sys.executable, "-m", "inferd.cli", "--log-level", "warning", "serve", "--config", str(path),
           "--port", str(port), "--api-key", API_KEY, "--store", f"sqlite:///{tmp}/ledger.db"]
    return Server("inferd", cmd, port).wait_ready()


def start_litellm(binary: str, mocks: dict[float, Server], tmp: Path) -> Server:
    config = {
        "model_list": [{"model_name": model_name(lat), "litellm_params": {
            "model": "openai/mock-model", "api_base": f"{m.url}/v1", "api_key": "unused"}}
            for lat, m in mocks.items()],
        "general_settings": {"master_key": API_KEY},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    cmd = [binary, "--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    # offline: the bundled cost map instead of a fetch from GitHub; no per-request log lines
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "WARNING", "LITELLM_TELEMETRY": "False",
           "NO_DOCS": "True"}
    return Server("litellm", cmd, port, env, health="/health/liveliness").wait_ready()


def litellm_versions(binary: str) -> dict:
    """litellm, uvicorn and fastapi as installed next to the `litellm` executable."""
    python = Path(binary).parent / "python"
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('litellm', 'uvicorn', 'fastapi', 'httpx', 'aiohttp', 'uvloop')}))")
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def inferd_stack_versions() -> dict:
    import importlib.metadata as m
    out = {}
    try:  # the numbers belong to a commit: the gateway changes faster than its version number
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=ROOT, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["commit"] = None
    for p in ("inferd", "uvicorn", "fastapi", "httptools", "uvloop", "aiohttp"):
        try:
            out[p] = m.version(p)
        except m.PackageNotFoundError:
            pass
    return out


# --- the plan ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(runs: list[dict], samples: dict[str, list[float]]) -> dict:
    ms = [x * 1000 for x in samples["latencies"]]
    ttft = [x * 1000 for x in samples["ttfts"]]
    oh = samples["overheads"]
    cpu = [r["cpu_ms_per_request"] for r in runs if r["cpu_ms_per_request"] is not None]
    if not ms and runs and runs[0]["percentiles_ms"]:  # wrk: its histograms, the median over the repeats
        latency = {q: statistics.median(r["percentiles_ms"][k] for r in runs)
                   for q, k in (("median", "p50"), ("p90", "p90"), ("p99", "p99"), ("max", "max"))}
    else:
        latency = {"median": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "max": max(ms, default=None)}
    return {
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "error_samples": sorted({e for r in runs for e in r["error_samples"]})[:5],
        "rps": statistics.median(r["rps"] for r in runs),
        "rps_all_runs": [round(r["rps"], 1) for r in runs],
        "latency_ms": latency,
        "ttft_ms": {"median": pct(ttft, 50), "p99": pct(ttft, 99)} if samples["stream"] else None,
        "overhead_header_ms": {"median": pct(oh, 50), "p90": pct(oh, 90), "p99": pct(oh, 99),
                               "max": max(oh, default=None), "count": len(oh)} if oh else None,
        "cpu_ms_per_request": statistics.median(cpu) if cpu else None,
        "foreign_cpu_share_max": max((r["foreign_cpu_share"] for r in runs if r["foreign_cpu_share"] is not None),
                                     default=None),
    }


def measure(srv: Server, model: str, stream: bool, c: int, args, everything: list[Server],
            target: str) -> tuple[RunResult, dict]:
    """One run, with the gateway's CPU per request and the share of the CPU other processes took meanwhile.
    Non-streamed runs use wrk when it is the load generator; streams need run_load's time to first event."""
    cpu_before = srv.cpu_seconds()
    busy_before, own_before, wall_before = _busy_seconds(), _own_seconds(everything), time.monotonic()
    body = chat_body(model, stream, MAX_TOKENS)
    if args.load_generator == "wrk" and not stream:
        res = run_wrk(srv.port, body, API_KEY, c, args.max_seconds, OVERHEAD_HEADERS.get(target))
    else:
        res = asyncio.run(run_load(srv.port, body, API_KEY, c, args.requests, args.max_seconds,
                                   OVERHEAD_HEADERS.get(target)))
    cpu = srv.cpu_seconds() - cpu_before
    foreign = (_busy_seconds() - busy_before) - (_own_seconds(everything) - own_before)
    n = res.completed
    return res, {"requests": n, "errors": res.errors, "error_samples": res.error_samples,
                 "elapsed_s": round(res.elapsed, 3), "rps": n / res.elapsed if res.elapsed else 0.0,
                 "percentiles_ms": res.percentiles_ms,
                 "cpu_ms_per_request": cpu * 1000 / n if n else None,
                 "foreign_cpu_share": max(0.0, foreign) / ((time.monotonic() - wall_before) * (os.cpu_count() or 1))}


def wait_for_quiet_cpu(everything: list[Server], max_share: float, deadline: float) -> None:
    """Until other processes use less than `max_share` of the cores over 5 s (or until `deadline`)."""
    while time.monotonic() < deadline:
        busy, own, t0 = _busy_seconds(), _own_seconds(everything), time.monotonic()
        time.sleep(5)
        share = ((_busy_seconds() - busy) - (_own_seconds(everything) - own)) / (
            (time.monotonic() - t0) * (os.cpu_count() or 1))
        if share <= max_share:
            return


def run_plan(args, servers: dict[str, Server], mocks: dict[float, Server]) -> dict:
    cases = [("chat", lat) for lat in args.latencies] + [("chat_stream", lat) for lat in args.stream_latencies]
    runs: dict = {}
    samples: dict = {}
    everything = [*servers.values(), *mocks.values()]
    redone = 0
    wait_deadline = time.monotonic() + args.load_wait  # all waiting for quiet together, so the run stays bounded
    for rep in range(args.repeats):
        for mode, lat in cases:
            for c in args.concurrency:
                k = len(TARGETS)
                order = [TARGETS[(i + rep) % k] for i in range(k)]  # rotated each repeat
                for target in order:
                    srv = servers[target] if target != "direct" else mocks[lat]
                    model = model_name(lat) if target != "direct" else "mock-model"
                    for attempt in range(1, args.attempts + 1):
                        res, run = measure(srv, model, mode == "chat_stream", c, args, everything, target)
                        run.update(repeat=rep, attempt=attempt)
                        if (run["foreign_cpu_share"] <= args.max_foreign or attempt == args.attempts
                                or time.monotonic() > wait_deadline):
                            break
                        redone += 1
                        # another process took part of the 2 cores: wait for it to end, then measure again
                        print(f"  other processes took {run['foreign_cpu_share'] * 100:.0f}% of the CPU: "
                              f"waiting for quiet and measuring again", flush=True)
                        wait_for_quiet_cpu(everything, args.max_foreign, wait_deadline)
                    n = res.completed
                    key = (mode, lat, target, c)
                    runs.setdefault(key, []).append(run)
                    s = samples.setdefault(key, {"latencies": [], "ttfts": [], "overheads": [],
                                                 "stream": mode == "chat_stream"})
                    s["latencies"] += res.latencies
                    s["ttfts"] += res.ttfts
                    s["overheads"] += res.overheads
                    med = (res.percentiles_ms["p50"] if res.percentiles_ms else
                           statistics.median(res.latencies) * 1000 if n else float("nan"))
                    print(f"[{rep + 1}/{args.repeats}] {mode:11s} upstream {lat:g} ms  c={c:<3d} "
                          f"{LABELS[target]:15s} {n:5d} req  {run['rps']:8.1f} req/s  median {med:7.2f} ms"
                          + f"  others {run['foreign_cpu_share'] * 100:3.0f}% CPU"
                          + (f"  errors {res.errors}" if res.errors else ""), flush=True)
    results: dict = {}
    for (mode, lat, target, c), rs in runs.items():
        summary = summarize(rs, samples[(mode, lat, target, c)])
        results.setdefault(mode, {}).setdefault(f"{lat:g}", {}).setdefault(target, {})[str(c)] = summary
    for mode, by_lat in results.items():  # added latency: gateway median minus direct median, same case
        for by_target in by_lat.values():
            for target, by_c in by_target.items():
                for c, s in by_c.items():
                    base = by_target["direct"][c]
                    s["added_median_ms"] = s["latency_ms"]["median"] - base["latency_ms"]["median"]
                    s["added_p99_ms"] = s["latency_ms"]["p99"] - base["latency_ms"]["p99"]
                    if s["ttft_ms"]:
                        s["added_ttft_median_ms"] = s["ttft_ms"]["median"] - base["ttft_ms"]["median"]
    return results, redone


def warm_up(servers: dict[str, Server], args) -> None:
    """First requests pay for imports, connection pools and caches: keep them out of the numbers."""
    for target, srv in servers.items():
        for lat in sorted(set(args.latencies) | set(args.stream_latencies)):
            for stream in (False, True):
                res = asyncio.run(run_load(srv.port, chat_body(model_name(lat), stream, MAX_TOKENS), API_KEY,
                                           8, 200, 10.0, None))
                if res.errors:
                    raise RuntimeError(f"{target} failed during warm-up: {res.error_samples}")


# --- output -----------------------------------------------------------------------------------------


def plot(data: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    res = data["results"]["chat"]
    lats = list(res)
    conc = data["args"]["concurrency"]
    fig, axes = plt.subplots(2, len(lats), figsize=(4.6 * len(lats), 6.4), squeeze=False)
    for j, lat in enumerate(lats):
        ax = axes[0][j]
        for t in TARGETS:
            ax.plot(conc, [res[lat][t][str(c)]["rps"] for c in conc], marker="o", label=LABELS[t], color=COLORS[t])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("requests/s")
        ax.set_title(f"throughput, upstream latency {lat} ms", fontsize=9)
        ax = axes[1][j]
        width = 0.38
        for i, t in enumerate(("inferd", "litellm")):
            xs = [x + (i - 0.5) * width for x in range(len(conc))]
            ax.bar(xs, [max(res[lat][t][str(c)]["added_median_ms"], 0.01) for c in conc], width,
                   label=f"{LABELS[t]} median", color=COLORS[t])
            ax.scatter(xs, [max(res[lat][t][str(c)]["added_p99_ms"], 0.01) for c in conc], marker="_", s=200,
                       color="black", zorder=3, label="added P99" if i == 0 else None)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(conc)), [str(c) for c in conc])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("added latency vs direct (ms)")
        ax.set_title(f"added latency, upstream latency {lat} ms", fontsize=9)
    axes[0][-1].legend(fontsize=8, loc="upper left")
    axes[1][0].legend(fontsize=8)
    fig.suptitle("Gateway overhead, non-streamed chat completions, same mock upstream, 2 shared cores", fontsize=10)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "gateway_overhead.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _f(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{x * 100:.0f}%"


def _oh(s: dict) -> str:
    oh = s.get("overhead_header_ms")
    return "–" if not oh else f"{oh['median']:.2f} / {oh['p99']:.1f}"


def doc(data: dict) -> None:
    m, v, a = data["machine"], data["versions"], data["args"]
    chat = data["results"]["chat"]
    rows = []
    for lat, by_target in chat.items():
        for c in a["concurrency"]:
            for t in TARGETS:
                s = by_target[t][str(c)]
                added = "–" if t == "direct" else _f(s["added_median_ms"], 2)
                rows.append(f"| {lat} | {c} | {LABELS[t]} | {s['requests']} | {s['errors']} | {s['rps']:.0f} | "
                            f"{_f(s['latency_ms']['median'], 2)} | {_f(s['latency_ms']['p99'], 2)} | {added} | "
                            f"{_oh(s)} | {_f(s['cpu_ms_per_request'], 2)} |")
    stream_rows = []
    for lat, by_target in data["results"].get("chat_stream", {}).items():
        for c in a["concurrency"]:
            for t in TARGETS:
                s = by_target[t][str(c)]
                added = "–" if t == "direct" else _f(s["added_ttft_median_ms"], 2)
                stream_rows.append(
                    f"| {lat} | {c} | {LABELS[t]} | {s['requests']} | {s['errors']} | {s['rps']:.0f} | "
                    f"{_f(s['ttft_ms']['median'], 2)} | {added} | {_f(s['latency_ms']['median'], 2)} | "
                    f"{_f(s['latency_ms']['p99'], 2)} | {_oh(s)} | {_f(s['cpu_ms_per_request'], 2)} |")
    lv = v["litellm"]
    findings = notes(data)
    if a["load_generator"] == "wrk":
        load = f"sent by `wrk -t1 -c<concurrency> -d{max(1, round(a['max_seconds']))}s` (a Lua script counts non-200 answers)"
        pooled = "the median over the repeats of wrk's percentiles"
    else:
        load = (f"sent by an asyncio closed loop until {a['requests']} requests were sent or "
                f"{a['max_seconds']:g} s passed")
        pooled = "all repeats pooled"
    stream_table = ""
    if stream_rows:
        stream_table = """
Streamed (`stream: true`, 16 chunks and `[DONE]`; TTFT: time to the first `data:` event;
the overhead headers are sent with the response headers, so they cover the time to the
first chunk):

| upstream latency (ms) | concurrency | target | requests | errors | req/s | TTFT median | added TTFT median | E2E median | E2E P99 | own overhead header median / P99 | gateway CPU ms/request |
|---|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(stream_rows) + "\n"
    write_doc_section("gateway_overhead", f"""## Gateway overhead vs LiteLLM's proxy (same mock upstream)

`python benchmarks/gateway_overhead.py --litellm /tmp/litellm-venv/bin/litellm` — the test
suite's mock OpenAI upstream (`tests/gateway/mock_upstream.py`, 16-word answers, a fixed
delay before each answer) behind inferd's gateway and behind LiteLLM's proxy, both on
loopback with one worker, both checking an API key, neither logging each request
(inferd meters every request into its SQLite usage ledger; LiteLLM runs without a database);
and the same load sent to the mock directly as the baseline. {m['date']}, {m['cpu']} ({m.get('isa', '?')}),
{m['cores']} cores **shared by the load generator, the mock upstream and the gateway**
(nothing pinned); load average before {data['loadavg_before']}, after {data['loadavg_after']}; other
processes took at most {_pct(data['foreign_cpu_share']['max'])} of the 2 cores during any kept run (median:
{_pct(data['foreign_cpu_share']['median_of_maxima'])}); a run during which they took more than
{a['max_foreign'] * 100:.0f}% was measured again (runs measured again: {data['foreign_cpu_share']['runs_redone']}).
inferd {v['inferd']['inferd']} (commit {v['inferd'].get('commit')}; uvicorn {v['inferd'].get('uvicorn')} with httptools
{v['inferd'].get('httptools')} on uvloop {v['inferd'].get('uvloop')}, aiohttp {v['inferd'].get('aiohttp')} to the upstream); LiteLLM
{lv.get('litellm', '?')} (uvicorn {lv.get('uvicorn')} on uvloop {lv.get('uvloop')}), installed apart from
inferd: `python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'`.
LiteLLM runs offline with `LITELLM_LOCAL_MODEL_COST_MAP=True` (its bundled cost map) and
refuses to start without a `master_key`.

    {' '.join(data['server_commands']['inferd'])}
    {' '.join(data['server_commands']['litellm'])}

Load: a closed loop of non-streamed chat completions (`max_tokens` {MAX_TOKENS}), each concurrent
worker on its own keep-alive connection, {load}; {a['repeats']} repeats, targets interleaved in a
rotating order. req/s: median over the repeats; latencies (ms): {pooled}; added: the gateway's median minus the direct
median at the same latency and concurrency. Own overhead header: `x-inferd-overhead-ms`
(time in inferd outside upstream calls) and LiteLLM's `x-litellm-overhead-duration-ms`.
Gateway CPU: CPU time of the gateway's process tree per request (the other processes on
the 2 cores take the rest).

| upstream latency (ms) | concurrency | target | requests | errors | req/s | median | P99 | added median | own overhead header median / P99 | gateway CPU ms/request |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{stream_table}
{findings}

{PROFILE}

![gateway overhead](../benchmarks/results/gateway_overhead.png)
""")


# what profiling the gateway found (py-spy on `inferd serve --config`, wrk -c32, 50 ms upstream), and what
# changed; kept with the table because it explains its shape
PROFILE = """Where a gateway request's CPU went, and what changed (py-spy on the server at 32 clients,
50 ms upstream, 2-core AMD EPYC): with httpx to the upstream, 73% of the samples were in httpcore's
connection pool, which on every request walks all pooled connections and checks each
socket (`is_idle`, `has_expired`, `getpeername`): 8.6 ms of CPU per request, so past about 8
clients the server was CPU-bound and throughput fell as clients rose (127 req/s at 32 clients,
74 with 441 ms mean latency in an earlier run). aiohttp's connector hands out an idle
connection in constant time: 1.4 ms per request. uvloop for the event loop and httptools
for uvicorn's parser took it to 0.97 ms; reading the proxy settings once (aiohttp's
`trust_env` reads the environment and ~/.netrc on every request: 4.7% of the samples) and
collecting the young GC generation less often (7% of the samples were collections at the
default threshold of 700 allocations) to about 0.8 ms. What remains is the ASGI stack
(FastAPI's routing and middleware, about 40% of the Python samples), socket writes (two
per response from uvicorn, one per upstream request) and the request's own work (parse,
admit, meter)."""


def notes(data: dict) -> str:
    """Observations that follow from this run's numbers."""
    chat = data["results"]["chat"]
    out = []
    zero = chat.get("0")
    if zero and "1" in zero["inferd"]:
        i1, l1 = zero["inferd"]["1"], zero["litellm"]["1"]
        out.append(f"At concurrency 1 with no upstream delay, inferd adds {i1['added_median_ms']:.2f} ms at the "
                   f"median and LiteLLM {l1['added_median_ms']:.2f} ms; at that point inferd's own header "
                   f"says {_f((i1['overhead_header_ms'] or {}).get('median'), 2)} ms and LiteLLM's "
                   f"{_f((l1['overhead_header_ms'] or {}).get('median'), 2)} ms.")
    top_notes = []
    for lat, by_target in chat.items():
        top = str(max(int(c) for c in by_target["inferd"]))
        parts = []
        for t in ("inferd", "litellm"):
            s = by_target[t][top]
            header = (s["overhead_header_ms"] or {}).get("median")
            if header is not None:
                parts.append(f"{LABELS[t]} adds {s['added_median_ms']:.1f} ms at the median, of which its own "
                             f"header accounts for {header:.1f} ms ({s['rps']:.0f} req/s, "
                             f"{_f(s['cpu_ms_per_request'], 1)} ms of gateway CPU per request)")
        if parts:
            top_notes.append(f"at concurrency {top} with upstream latency {lat} ms, " + "; ".join(parts))
    if top_notes:
        text = "; ".join(top_notes)
        out.append(text[0].upper() + text[1:] + ". What a header leaves out is time the gateway counts as "
                   "upstream (its HTTP client and connection pool included) and time on the socket to the client.")
    return "\n\n".join(out)


def foreign_share(results: dict) -> dict:
    """How much CPU other processes took during the runs: the numbers are only as clean as this."""
    shares = [s["foreign_cpu_share_max"] for by_lat in results.values() for by_t in by_lat.values()
              for by_c in by_t.values() for s in by_c.values() if s["foreign_cpu_share_max"] is not None]
    return {"max": max(shares, default=None), "median_of_maxima": statistics.median(shares) if shares else None}


def _display(cmd: list[str]) -> list[str]:
    """A command as the docs show it: file names without directories, PORT for the port."""
    out = [Path(x).name if "/" in x else x for x in cmd]
    return [("PORT" if i and out[i - 1] == "--port" else x) for i, x in enumerate(out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_litellm = "/tmp/litellm-venv/bin/litellm"
    ap.add_argument("--litellm", default=default_litellm if Path(default_litellm).exists() else "litellm",
                    help="the `litellm` executable (of a venv with 'litellm[proxy]')")
    ap.add_argument("--latencies", default="0,50", help="upstream latency cases in ms, comma-separated")
    ap.add_argument("--stream-latencies", default="0", help="latency cases also run streamed ('' for none)")
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--load-generator", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python",
                    help="for non-streamed runs: wrk (apt-get install wrk; the default where installed) or the "
                         "asyncio closed loop (streamed runs always use the latter: they time the first event)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per run (at most)")
    ap.add_argument("--max-seconds", type=float, default=4.0, help="a run stops sending after this long")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-load", type=float, default=1.0, help="wait until the 1-minute load is below this")
    ap.add_argument("--load-wait", type=float, default=600.0,
                    help="seconds to wait for a quiet machine at most: before the start, and in all during the runs")
    ap.add_argument("--max-foreign", type=float, default=0.1,
                    help="a run during which other processes took more than this share of the CPU is measured again")
    ap.add_argument("--attempts", type=int, default=4, help="measurements of a run at most (see --max-foreign)")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()
    args.latencies = [float(x) for x in args.latencies.split(",") if x]
    args.stream_latencies = [float(x) for x in args.stream_latencies.split(",") if x]
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]

    load_before = wait_for_quiet(args.max_load, args.load_wait)
    started = time.monotonic()
    versions = {"inferd": inferd_stack_versions(), "litellm": litellm_versions(args.litellm)}
    mocks: dict[float, Server] = {}
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for lat in sorted(set(args.latencies) | set(args.stream_latencies)):
                mocks[lat] = start_mock(lat)
            servers["inferd"] = start_inferd(mocks, Path(tmp))
            servers["litellm"] = start_litellm(args.litellm, mocks, Path(tmp))
            warm_up(servers, args)
            results, redone = run_plan(args, servers, mocks)
        finally:
            for srv in [*servers.values(), *mocks.values()]:
                srv.stop()
    load_after = loadavg()

    m = machine_info()
    data = {
        "args": {**vars(args), "litellm": Path(args.litellm).name},
        "machine": m, "loadavg_before": load_before, "loadavg_after": load_after,
        "duration_s": round(time.monotonic() - started, 1),
        "versions": versions,
        "foreign_cpu_share": {**foreign_share(results), "runs_redone": redone},
        "server_commands": {k: _display(s.cmd) for k, s in servers.items()},
        "results": results,
    }
    save_json("gateway_overhead", data)
    plot(data)
    if not args.no_doc:
        doc(data)
    for lat, by_target in results["chat"].items():
        for c in args.concurrency:
            print(f"upstream {lat} ms, c={c}: " + ", ".join(
                f"{t} {by_target[t][str(c)]['rps']:.0f} req/s (+{by_target[t][str(c)]['added_median_ms']:.2f} ms)"
                for t in TARGETS))
    print(f"done in {data['duration_s']} s")


if __name__ == "__main__":
    main()
