"""Online serving: `inferd serve` vs llama.cpp's `llama-server`, same GGUF, same threads, same client.

Each server runs alone on loopback, one after the other (never both at once), on
the embedded SmolLM2-135M-Instruct Q4_1 GGUF, with the same number of threads.
Against each, `inferd bench serve` (a separate client process) runs:

- c1:      16 requests, concurrency 1,  ~150 prompt tokens, 64 output tokens (ignore_eos)
- c16:     64 requests, concurrency 16, ~150 prompt tokens, 64 output tokens (ignore_eos)
- prefill: 16 requests, concurrency 1,  ~512 prompt tokens, 1 output token: prompt tokens/s

Prompts are random words (no prefix a prompt cache could reuse), the same for
both servers (one seed per scenario). llama-server runs with `-np 16 -c 4096`
(16 slots of 256 tokens, continuous batching); a 512-token prompt does not fit a
256-token slot, so for the prefill scenario it is restarted with `-np 1 -c 1024`.
inferd runs with its defaults (`--num-threads` set). Everything runs `--repeats`
times (3), engines interleaved, each time on a freshly started server; per engine
and scenario the median run by its headline number (output tokens/s, prompt
tokens/s for prefill) is reported, with every run's headline number.
The AVX2 rows run both servers as an AVX2-only CPU would, on any machine: inferd
with `ATEN_CPU_CAPABILITY=avx2` (its kernels built for x86-64-v3, torch's AVX2 code)
and llama.cpp built with AVX2 only (`ISA=avx2 build_llama_cpp.sh`). `inferd-gguf-q8`
is inferd with `--quantization gguf-q8` (one int8 activation term, as llama.cpp).
Then the KV-cache row: 64 concurrent clients against inferd with a small
`--kv-cache-bytes`, the default KV cache and `--kv-cache-dtype int8`
(benchmarks/kv_cache_int8.py's driver). Writes
benchmarks/results/serve_vs_llamacpp.json, two PNG plots and the
`serve_vs_llamacpp` section of docs/benchmarks.md.

    benchmarks/peers/build_llama_cpp.sh            # once: builds benchmarks/peers/bin/llama-server
    ISA=avx2 benchmarks/peers/build_llama_cpp.sh   # once: benchmarks/peers/bin-avx2/llama-server
    python benchmarks/serve_vs_llamacpp.py         # on an otherwise idle machine
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, ROOT, loadavg, Server, machine_info, save_json, write_doc_section  # noqa: E402

LLAMA_SERVER = ROOT / "benchmarks" / "peers" / "bin" / "llama-server"
LLAMA_SERVER_AVX2 = ROOT / "benchmarks" / "peers" / "bin-avx2" / "llama-server"
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# inferd variants: (extra flags, environment); llama.cpp builds: the binary
INFERD = {"inferd": ([], {}), "inferd-gguf-q8": (["--quantization", "gguf-q8"], {}), "inferd-avx2": ([], AVX2_ENV)}
LLAMA = {"llama.cpp": LLAMA_SERVER, "llama.cpp-avx2": LLAMA_SERVER_AVX2}
ENGINES = ("inferd", "inferd-gguf-q8", "llama.cpp", "inferd-avx2", "llama.cpp-avx2")
# each inferd variant against the llama.cpp build for the same instruction set
PEER = {"inferd": "llama.cpp", "inferd-gguf-q8": "llama.cpp", "inferd-avx2": "llama.cpp-avx2"}

# name -> (num_prompts, max_concurrency, input_len, output_len, seed)
SCENARIOS = {
    "c1": (16, 1, 150, 64, 1001),
    "c16": (64, 16, 150, 64, 1016),
    "prefill": (16, 1, 512, 1, 1512),
}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_inferd(name: str, gguf: Path, threads: int) -> Server:
    port = free_port()
    flags, env = INFERD[name]
    cmd = [sys.executable, "-m", "inferd.cli", "--log-level", "warning", "serve", str(gguf),
           "--port", str(port), "--num-threads", str(threads), *flags]
    return Server(name, cmd, port, {"OMP_NUM_THREADS": str(threads), **env}).wait_ready()


def start_llama(name: str, binary: Path, gguf: Path, threads: int, slots: int, ctx: int) -> Server:
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(ctx), "-t", str(threads), "-tb", str(threads),
           # the repacked (AMX) kernels of a native build stop with an illegal instruction on some machines
           "--no-repack"]
    return Server(name, cmd, port).wait_ready()


def bench(server: Server, scenario: str, endpoint: str, out_dir: Path) -> dict:
    n, c, in_len, out_len, seed = SCENARIOS[scenario]
    result = out_dir / f"{server.name}-{scenario}.json"
    cmd = [sys.executable, "-m", "inferd.cli", "bench", "serve", "--base-url", server.url,
           "--endpoint", endpoint, "--num-prompts", str(n), "--max-concurrency", str(c),
           "--input-len", str(in_len), "--output-len", str(out_len), "--seed", str(seed),
           "--result-json", str(result)]
    print(f"\n## {server.name} {scenario}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(result.read_text())




def llama_version(binary: Path) -> str:
    version_file = binary.parent / "VERSION"
    sdist = version_file.read_text().splitlines()[0] if version_file.exists() else ""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        line = next((ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")), "")
    except (OSError, subprocess.TimeoutExpired):
        line = ""
    return ", ".join(x for x in (f"vendored in {sdist}" if sdist else "", line) if x) or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-cache-bytes", default="96MiB", help="the KV-cache row's budget")
    ap.add_argument("--kv-requests", type=int, default=192, help="requests of the KV-cache row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per engine (interleaved); the median run by headline number is reported")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()

    from inferd.models.default_model import default_model_path
    gguf = default_model_path()
    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e in LLAMA and not LLAMA[e].is_file():
            sys.exit(f"{LLAMA[e]} not found: build it with benchmarks/peers/build_llama_cpp.sh "
                     f"({'ISA=avx2 ' if 'avx2' in e else ''})")

    load_before = loadavg()
    runs: dict[str, dict[str, list[dict]]] = {e: {sc: [] for sc in SCENARIOS} for e in engines}
    server_cmds: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        for rep in range(args.repeats):  # engines interleaved, each on a freshly started server
            for engine in engines:
                print(f"\n# repeat {rep + 1}/{args.repeats}: {engine}", flush=True)
                if engine in INFERD:
                    groups = [(engine, lambda: start_inferd(engine, gguf, args.threads), list(SCENARIOS))]
                else:
                    binary = LLAMA[engine]
                    groups = [(engine, lambda: start_llama(engine, binary, gguf, args.threads, 16, 16 * 256),
                               ["c1", "c16"]),
                              (f"{engine} (prefill)",
                               lambda: start_llama(engine, binary, gguf, args.threads, 1, 1024), ["prefill"])]
                for label, start, scenarios in groups:
                    srv = start()
                    server_cmds[label] = srv.cmd
                    try:
                        for sc in scenarios:
                            runs[engine][sc].append(bench(srv, sc, args.endpoint, out_dir))
                    finally:
                        srv.stop()
    kv_rows = kv_cache_rows(args) if "inferd" in engines else {}
    # per engine and scenario, the median run by the scenario's headline number
    results = {e: {sc: median_run(sc, rs) for sc, rs in by_sc.items()} for e, by_sc in runs.items()}
    spread = {e: {sc: sorted(headline(sc, r) for r in rs) for sc, rs in by_sc.items()} for e, by_sc in runs.items()}

    m = machine_info()
    m["loadavg_before"], m["loadavg_after"] = load_before, loadavg()
    data = {
        "args": vars(args), "machine": m, "model": str(gguf.name),
        "versions": {"inferd": m["inferd"], "torch": m["torch"],
                     **{e: llama_version(LLAMA[e]) for e in engines if e in LLAMA}},
        "isa": {e: "AVX2 (forced)" if "avx2" in e else m["isa"] for e in engines},
        "kv_cache": kv_rows,
        "scenarios": {k: dict(zip(("num_prompts", "max_concurrency", "input_len", "output_len", "seed"), v))
                      for k, v in SCENARIOS.items()},
        "server_commands": {k: _display(v) for k, v in server_cmds.items()},
        "results": results,
        "headline_all_runs": spread,
        "ratios": ratios(results),
    }
    for engine in results:  # keep the JSON small: per-request timings (no ITL lists) only for c16
        for sc, r in results[engine].items():
            reqs = r.pop("requests", [])
            if sc == "c16":
                r["requests"] = [{k: round(q[k], 5) if isinstance(q[k], float) else q[k]
                                  for k in ("success", "start", "prompt_len", "output_tokens", "ttft", "tpot", "e2el")}
                                 for q in reqs]
    save_json("serve_vs_llamacpp", data)
    if set(results) == set(ENGINES):
        plot(results)
        if not args.no_doc:
            doc(data)
    print(json.dumps(data["ratios"], indent=2))


def kv_cache_rows(args) -> dict:
    """The default KV cache and int8 under 64 clients at the same --kv-cache-bytes (one run each)."""
    from benchmarks import kv_cache_int8

    ns = argparse.Namespace(kv_cache_bytes=args.kv_cache_bytes, requests=args.kv_requests, concurrency=64,
                            max_tokens=64)
    return {kv: kv_cache_int8.serve(kv, ns) for kv in ("auto", "int8")}


def _display(cmd: list[str]) -> list[str]:
    """A server command as the docs show it: file names without directories, PORT for the port."""
    out = [Path(x).name if "/" in x else x for x in cmd]
    return [("PORT" if i and out[i - 1] == "--port" else x) for i, x in enumerate(out)]


def _m(results, engine, sc):
    return results[engine][sc]["metrics"]


def prefill_tps(r: dict) -> float:
    """Prompt tokens per second at concurrency 1: all prompt tokens / the sum of the TTFTs."""
    x = r["metrics"]
    return x["total_input_tokens"] / (x["ttft_ms"]["mean"] / 1000 * x["completed"])


def headline(scenario: str, run: dict) -> float:
    """Output tokens/s for c1 and c16, prompt tokens/s for prefill."""
    return prefill_tps(run) if scenario == "prefill" else run["metrics"]["output_throughput"]


def median_run(scenario: str, runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: headline(scenario, r))[(len(runs) - 1) // 2]


def ratios(results: dict) -> dict:
    """Per inferd variant, its figures over those of the llama.cpp build for its instruction set."""
    return {a: _ratios(results, a, PEER[a]) for a in results if a in PEER and PEER[a] in results}


def _ratios(results: dict, a: str, b: str) -> dict:
    return {
        "output_tok_s_c16": _m(results, a, "c16")["output_throughput"] / _m(results, b, "c16")["output_throughput"],
        "output_tok_s_c1": _m(results, a, "c1")["output_throughput"] / _m(results, b, "c1")["output_throughput"],
        "median_ttft_c1": _m(results, a, "c1")["ttft_ms"]["median"] / _m(results, b, "c1")["ttft_ms"]["median"],
        "median_ttft_c16": _m(results, a, "c16")["ttft_ms"]["median"] / _m(results, b, "c16")["ttft_ms"]["median"],
        "median_tpot_c1": _m(results, a, "c1")["tpot_ms"]["median"] / _m(results, b, "c1")["tpot_ms"]["median"],
        "median_tpot_c16": _m(results, a, "c16")["tpot_ms"]["median"] / _m(results, b, "c16")["tpot_ms"]["median"],
        "prefill_tok_s": prefill_tps(results[a]["prefill"]) / prefill_tps(results[b]["prefill"]),
    }


COLORS = {"inferd": "#2a7", "inferd-gguf-q8": "#27a", "llama.cpp": "#c63", "inferd-avx2": "#7b5",
          "llama.cpp-avx2": "#e96"}


def plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for e in results:
        ys = [_m(results, e, sc)["output_throughput"] for sc in ("c1", "c16")]
        ax.plot([1, 16], ys, marker="o", label=e, color=COLORS[e])
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 16], ["1", "16"])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Serving throughput, SmolLM2-135M Q4_1, 2 threads", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_vs_llamacpp_throughput.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2))
    stats = ("median", "p90", "p99")
    width = 0.8 / len(results)
    for ax, (metric, sc) in zip(axes, [("ttft_ms", "c1"), ("ttft_ms", "c16"), ("tpot_ms", "c1"), ("tpot_ms", "c16")]):
        for i, e in enumerate(results):
            vals = [_m(results, e, sc)[metric][s] for s in stats]
            ax.bar([x + (i - (len(results) - 1) / 2) * width for x in range(len(stats))], vals, width,
                   label=e, color=COLORS[e])
        ax.set_xticks(range(len(stats)), stats)
        ax.set_title(f"{metric.split('_')[0].upper()} (ms), concurrency {sc[1:]}", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_vs_llamacpp_latency.png", dpi=100)
    plt.close(fig)


def doc(data: dict) -> None:
    m, res, r, v = data["machine"], data["results"], data["ratios"], data["versions"]

    def row(e, sc):
        x = _m(res, e, sc)
        return (f"| {e} | {data['isa'][e]} | {sc[1:]} | {x['completed']} | {x['request_throughput']:.2f} | "
                f"{x['output_throughput']:.1f} | {x['ttft_ms']['median']:.0f} | {x['ttft_ms']['p99']:.0f} | "
                f"{x['tpot_ms']['median']:.1f} | {x['tpot_ms']['p99']:.1f} | {x['itl_ms']['median']:.1f} | "
                f"{x['e2el_ms']['median']:.0f} |")

    rows = "\n".join(row(e, sc) for sc in ("c1", "c16") for e in res)
    pre = "\n".join(
        f"| {e} | {data['isa'][e]} | {res[e]['prefill']['metrics']['total_input_tokens'] / res[e]['prefill']['metrics']['completed']:.0f} | "
        f"{res[e]['prefill']['metrics']['ttft_ms']['median']:.0f} | {prefill_tps(res[e]['prefill']):.0f} |"
        for e in res)
    spread = "; ".join(
        f"{sc} {e}: " + ", ".join(f"{x:.0f}" for x in data["headline_all_runs"][e][sc])
        for sc in ("c1", "c16", "prefill") for e in res)
    kv = data["kv_cache"]
    kv_rows = "\n".join(
        f"| {name} | {data['args']['kv_cache_bytes']} | {kv[k]['max_running']:.0f} | {kv[k]['median_running']:.0f} | "
        f"{kv[k]['output_tok_s']:.1f} |"
        for k, name in (("auto", "default (the model's dtype)"), ("int8", "`--kv-cache-dtype int8`")) if k in kv)
    cmds = "\n".join(f"    {k}: {' '.join(c)}" for k, c in data["server_commands"].items())
    summary = "\n\n".join(
        f"{e} / {PEER[e]}: output tok/s at concurrency 16 **{q['output_tok_s_c16']:.2f}x** "
        f"(at 1: {q['output_tok_s_c1']:.2f}x); median TTFT {q['median_ttft_c1']:.2f}x at concurrency 1, "
        f"**{q['median_ttft_c16']:.2f}x** at 16; median TPOT at concurrency 1 **{q['median_tpot_c1']:.2f}x** "
        f"({_m(res, e, 'c1')['tpot_ms']['median']:.1f} vs {_m(res, PEER[e], 'c1')['tpot_ms']['median']:.1f} ms), "
        f"at 16 {q['median_tpot_c16']:.2f}x; prefill tok/s **{q['prefill_tok_s']:.2f}x**."
        for e, q in r.items())
    write_doc_section("serve_vs_llamacpp", f"""## Online serving vs llama.cpp (`llama-server`)

`python benchmarks/serve_vs_llamacpp.py` — `inferd bench serve` (streaming, `{data['args']['endpoint']}`,
random-word prompts, greedy, `ignore_eos`) against each server in turn, alone on
loopback, same GGUF ({data['model']}), {data['args']['threads']} threads each. {m['date']}, {m['cpu']},
{m['cores']} cores (the client shares them), load average before {m['loadavg_before']}.
inferd {v['inferd']} (torch {v['torch']}), llama.cpp {v['llama.cpp']}
(built by `benchmarks/peers/build_llama_cpp.sh`).

{cmds}

~150 prompt tokens, 64 output tokens; concurrency 1: 16 requests, concurrency 16: 64 requests.
Latencies in ms (TTFT: time to first token; TPOT: per output token after the first; ITL:
between streamed chunks; E2E: whole request).

| server | ISA | concurrency | requests | req/s | output tok/s | TTFT median | TTFT P99 | TPOT median | TPOT P99 | ITL median | E2E median |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Prefill: 16 requests of ~512 prompt tokens, 1 output token, concurrency 1
(prompt tokens/s = prompt tokens / TTFT; llama-server's own log reports the same prompt
speed for its runs, so the client's measurement is not what makes it slow).

| server | ISA | prompt tokens | TTFT median (ms) | prompt tok/s |
|---|---|---|---|---|
{pre}

{summary}
(Ratios of latencies above 1 mean inferd is slower.)

Concurrency 64, inferd (default flags, {data['isa']['inferd']}), the same KV bytes: 64 clients each
sending a ~150-token prompt for 64 tokens and the next when answered, {data['args']['kv_requests']}
requests; requests running at once read from `/metrics` every 0.1 s.

| KV cache | --kv-cache-bytes | most requests running | median running | output tok/s |
|---|---|---|---|---|
{kv_rows}

Each number is from the median of {data['args']['repeats']} runs (engines interleaved, a fresh server
each run), ranked by output tok/s (prefill: prompt tok/s); every run's value: {spread}.

![serving throughput](../benchmarks/results/serve_vs_llamacpp_throughput.png)
![serving latency](../benchmarks/results/serve_vs_llamacpp_latency.png)
""")


if __name__ == "__main__":
    main()
