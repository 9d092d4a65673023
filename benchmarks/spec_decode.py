"""Speculative decoding (prompt lookup, a draft model) vs the same server without it, through the HTTP API;
llama.cpp's server with its own speculative decoding in the same run.

Servers on the embedded SmolLM2-135M-Instruct (its Q4_1 GGUF), one at a time on
loopback, the same threads each:

- `off`: `inferd serve`, no speculation;
- `ngram`: `--speculative-method ngram --num-speculative-tokens 4` (prompt lookup, adaptive);
- `draft`: `--speculative-config '{"method": "draft_model", "quantization": "int4"}'
  --num-speculative-tokens 8`: the int4 self-draft (the model's own weights at int4,
  no second file; adaptive);
- `llama.cpp`, `llama.cpp-draft`, `llama.cpp-ngram`: `llama-server` (built by
  benchmarks/peers/build_llama_cpp.sh; skipped when it is not there) without
  speculation, with the same GGUF as its draft model (`-md`, `--spec-type
  draft-simple`, 8 drafts) and with its prompt lookup (`--spec-type ngram-simple`,
  3-gram lookup, 4 drafts). `--no-repack`: the repacked (AMX) kernels of a native
  build stop with an illegal instruction where the OS does not grant AMX.

Against each, the same streaming client (`inferd.bench.serve.run_benchmark`, greedy)
runs five scenarios:

- grounded-c1 / grounded-c16: chat requests that work on a text given in the prompt
  (correct its spelling, rewrite it, extract its sentences about one subject,
  summarize it); seeded synthetic paragraphs, up to 128 output tokens, each answer
  ends where the model ends it;
- random-c1 / random-c16: random-word completions (as benchmarks/serve_vs_llamacpp.py),
  64 output tokens with ignore_eos;
- sampled-c16: the same at temperature 1.0, where drafts are mostly rejected: the
  case where speculation must switch itself off.

Concurrency 1 runs 6 requests, concurrency 16 runs 16. All servers are started
first and only one works at a time: each scenario runs on every server in turn,
`--repeats` times (2; llama.cpp's `--llama-repeats`, 1) in alternating order, so
that load from elsewhere on a shared machine drifts over all alike; the median TPOT run is reported, and each
speculative configuration's speedup is the median of its per-repeat TPOT ratios to
its engine's `off` run. The acceptance figures are the `spec_decode_*` counters of
/metrics (vLLM's names, which llama-server uses too), read before and after each
scenario. Also reported: how many answers are token for token the same as without
speculation (greedy; where they differ, a multi-row matmul rounded differently in
bf16, see docs/speculative_decoding.md). Writes benchmarks/results/spec_decode.json,
a PNG plot and the `spec_decode` section of docs/benchmarks.md.

    python benchmarks/spec_decode.py                  # ~15 minutes on 2 cores
    python benchmarks/spec_decode.py --configs off,draft --scenarios grounded-c1
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, Server, isa, loadavg, machine_info, save_json, write_doc_section  # noqa: E402
from inferd.bench.datasets import TextPrompt, random_text_prompts  # noqa: E402
from inferd.bench.metrics import compute_metrics  # noqa: E402
from inferd.bench.serve import run_benchmark  # noqa: E402

LLAMA_SERVER = ROOT / "benchmarks" / "peers" / "bin" / "llama-server"
# name -> (engine, extra server arguments)
CONFIGS = {
    "off": ("inferd", []),
    "ngram": ("inferd", ["--speculative-method", "ngram", "--num-speculative-tokens", "4"]),
    "draft": ("inferd", ["--speculative-config", '{"method": "draft_model", "quantization": "int4"}',
                         "--num-speculative-tokens", "8"]),
    "llama.cpp": ("llama.cpp", []),
    "llama.cpp-draft": ("llama.cpp", ["-md", "GGUF", "--spec-type", "draft-simple", "--spec-draft-n-max", "8"]),
    "llama.cpp-ngram": ("llama.cpp", ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                                      "--spec-ngram-simple-size-m", "4"]),
}
BASELINE = {"inferd": "off", "llama.cpp": "llama.cpp"}  # each engine's configuration without speculation
# name -> (workload, num_prompts, max_concurrency, output_len, seed)
SCENARIOS = {
    "grounded-c1": ("grounded", 6, 1, 128, 2001),
    "grounded-c16": ("grounded", 16, 16, 128, 2016),
    "random-c1": ("random", 6, 1, 64, 3001),
    "random-c16": ("random", 16, 16, 64, 3016),
    "sampled-c16": ("sampled", 16, 16, 64, 4016),
}
SPEC_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
MAX_POSITIONS = 8  # acceptance per draft position reported for positions 1..8

# -- the input-grounded workload ----------------------------------------------------------

_NAMES = ["Anna", "Marco", "Priya", "Tom", "Lena", "Kenji", "Sofia", "Omar", "Julia", "Ravi"]
_PLACES = ["the north district", "the harbor", "the old town", "the university", "the train station",
           "the city library", "the market square", "the river park"]
_SUBJECTS = ["budget", "bridge", "school", "library", "park", "bus line", "water supply", "festival"]
_SENTENCES = [
    "{name} said that the {subject} near {place} needs about {n} new workers before the winter.",
    "The council agreed to spend {n} thousand euros on the {subject} in {place}.",
    "According to {name}, the {subject} has been closed for {n} days because of the storm.",
    "Residents of {place} asked for a meeting about the {subject} next {day}.",
    "{name} and {name2} will present a new plan for the {subject} on {day}.",
    "The report shows that {n} percent of the people in {place} use the {subject} every week.",
    "A decision about the {subject} was postponed until {day}, when {name} returns.",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
_TYPOS = {"the": "teh", "about": "abuot", "because": "becuase", "people": "poeple", "which": "wich",
          "meeting": "meetting", "decision": "desicion", "agreed": "agred", "winter": "wintr"}
_TASKS = [
    ("Correct the spelling mistakes in the following text. Return the whole corrected text and nothing else."
     "\n\n{text}", True),
    ("Rewrite the following text in the past tense. Keep every name and number.\n\n{text}", False),
    ("Copy every sentence of the following text that mentions the {subject}, word for word.\n\n{text}", False),
    ("Summarize the following text in two sentences.\n\n{text}", False),
]


def grounded_prompts(n: int, seed: int) -> list[TextPrompt]:
    """`n` chat prompts, each a task over a seeded synthetic paragraph."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        subject = rng.choice(_SUBJECTS)
        sentences = []
        for _ in range(rng.randint(5, 7)):
            names = rng.sample(_NAMES, 2)
            sentences.append(rng.choice(_SENTENCES).format(
                name=names[0], name2=names[1], place=rng.choice(_PLACES), n=rng.randint(2, 90),
                day=rng.choice(_DAYS), subject=subject if rng.random() < 0.6 else rng.choice(_SUBJECTS)))
        template, typos = _TASKS[i % len(_TASKS)]
        text = " ".join(sentences)
        if typos:
            text = re.sub(r"\b(\w+)\b", lambda m: _TYPOS.get(m.group(1), m.group(1))
                          if rng.random() < 0.5 else m.group(1), text)
        body = template.format(text=text, subject=subject)
        prompts.append(TextPrompt(body, round(len(body.split()) * 1.3), False))
    return prompts


# -- running ------------------------------------------------------------------------------

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(config: str, threads: int, gguf: Path, llama_server: Path) -> Server:
    engine, extra = CONFIGS[config]
    port = free_port()
    if engine == "inferd":
        cmd = [sys.executable, "-m", "inferd.cli", "--log-level", "warning", "serve", str(gguf), "--port", str(port),
               "--num-threads", str(threads), "--served-model-name", "smollm2", *extra]
        return Server(config, cmd, port, {"OMP_NUM_THREADS": str(threads)}).wait_ready()
    # 16 slots of 512 tokens (a grounded prompt and its answer fit one); the draft gets the same threads
    cmd = [str(llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "16",
           "-c", str(16 * 512), "-t", str(threads), "-tb", str(threads), "-td", str(threads), "--no-repack",
           "--metrics", *[str(gguf) if x == "GGUF" else x for x in extra]]
    return Server(config, cmd, port).wait_ready()


def spec_counters(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10, trust_env=False).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'(?:inferd|llamacpp):(spec_decode_\w+?)_total(?:\{([^}]*)\})? (\S+)', line)
        if not m:
            continue
        pos = re.search(r'position="(\d+)"', m.group(2) or "")
        values[m.group(1) + (f":{pos.group(1)}" if pos else "")] = float(m.group(3))
    return values


def run_scenario(server: Server, scenario: str, tokenizer) -> dict:
    workload, n, c, out_len, seed = SCENARIOS[scenario]
    if workload == "grounded":
        prompts, endpoint, ignore_eos = grounded_prompts(n + 1, seed), "/v1/chat/completions", False
    else:
        prompts, endpoint, ignore_eos = random_text_prompts(n + 1, 150, seed, tokenizer), "/v1/completions", True
    extra = {"temperature": 1.0} if workload == "sampled" else None
    before = spec_counters(server)
    results, duration = asyncio.run(run_benchmark(
        base_url=server.url, endpoint=endpoint, model="smollm2", prompts=prompts[1:], output_len=out_len,
        max_concurrency=c, seed=seed, ignore_eos=ignore_eos, tokenizer=tokenizer, warmup_prompt=prompts[0],
        extra_body=extra))
    after = spec_counters(server)
    metrics = compute_metrics(results, duration)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    texts = [r.generated_text for r in results]
    print(f"  {server.name:16} {scenario:13} TPOT median {metrics['tpot_ms']['median']:7.1f} ms, "
          f"{metrics['output_throughput']:6.1f} output tok/s, drafts {delta.get('spec_decode_num_draft_tokens', 0):.0f}"
          f" accepted {delta.get('spec_decode_num_accepted_tokens', 0):.0f}", flush=True)
    return {"metrics": metrics, "spec": delta, "texts": texts}


def render(name: str = "spec_decode") -> None:
    """Write the docs section again from the saved results (after a change to its wording)."""
    import json
    write_doc_section(name, doc(json.loads((RESULTS / f"{name}.json").read_text()), name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per server (1: on a shared machine, 2 OpenMP threads wait on each other)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--llama-server", default=str(LLAMA_SERVER))
    ap.add_argument("--llama-repeats", type=int, default=1,
                    help="repeats of the llama.cpp configurations (the first ones; at 16 requests on one thread "
                         "its server is several times slower than inferd's, so a repeat of it costs minutes)")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    llama_server = Path(args.llama_server)
    configs = [c for c in args.configs.split(",") if c]
    skipped = [c for c in configs if CONFIGS[c][0] == "llama.cpp" and not llama_server.is_file()]
    if skipped:
        print(f"{llama_server} not found (benchmarks/peers/build_llama_cpp.sh): without {', '.join(skipped)}")
        configs = [c for c in configs if c not in skipped]

    from inferd.bench.serve import load_tokenizer
    from inferd.models.default_model import default_model_path
    gguf = default_model_path()
    tokenizer = load_tokenizer("auto")
    load_before = loadavg()
    runs: dict[str, dict[str, list[dict]]] = {c: {s: [] for s in scenarios} for c in configs}
    servers: dict[str, Server] = {}
    try:
        for c in configs:  # all up; one runs at a time
            servers[c] = start(c, args.threads, gguf, llama_server)
        for rep in range(args.repeats):
            for sc in scenarios:  # back to back per scenario, in alternating order, so drifting load hits all
                for config in configs if rep % 2 == 0 else reversed(configs):
                    if CONFIGS[config][0] == "llama.cpp" and rep >= args.llama_repeats:
                        continue
                    runs[config][sc].append(run_scenario(servers[config], sc, tokenizer))
    finally:
        for srv in servers.values():
            srv.stop()
    commands = {c: _display(srv.cmd) for c, srv in servers.items()}
    m = machine_info()
    m["loadavg_before"], m["loadavg_after"] = load_before, loadavg()
    m["isa"] = _isa()
    if any(CONFIGS[c][0] == "llama.cpp" for c in configs):
        from benchmarks.serve_vs_llamacpp import llama_version
        m["llama_cpp"] = llama_version(llama_server)
    summary = {s: {c: _summary(runs, c, s) for c in configs} for s in scenarios}
    data = {"args": vars(args), "machine": m, "scenarios": {s: dict(zip(
        ("workload", "num_prompts", "max_concurrency", "output_len", "seed"), SCENARIOS[s])) for s in scenarios},
        "server_commands": commands, "summary": summary,
        "tpot_all_runs": {c: {s: [r["metrics"]["tpot_ms"]["median"] for r in rs] for s, rs in by.items()}
                          for c, by in runs.items()}}
    save_json("spec_decode", data)
    plot(summary, "spec_decode")
    for s, by in summary.items():
        for c, row in by.items():
            print(s, c, {k: v for k, v in row.items() if k != "tpot_speedup_paired_all"})
    if not args.no_doc:
        write_doc_section("spec_decode", doc(data, "spec_decode"))


def _median(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["metrics"]["tpot_ms"]["median"])[(len(runs) - 1) // 2]


def _summary(runs: dict, config: str, scenario: str) -> dict:
    on = _median(runs[config][scenario])
    row = {"tpot_ms": on["metrics"]["tpot_ms"]["median"], "tok_s": on["metrics"]["output_throughput"]}
    base = BASELINE[CONFIGS[config][0]]
    if config == base or base not in runs:
        return row
    spec = on["spec"]
    drafts = spec.get("spec_decode_num_drafts", 0)
    draft_tokens = spec.get("spec_decode_num_draft_tokens", 0)
    accepted = spec.get("spec_decode_num_accepted_tokens", 0)
    per_pos = [spec.get(f"spec_decode_num_accepted_tokens_per_pos:{k}", 0) / drafts if drafts else 0.0
               for k in range(MAX_POSITIONS)]
    same = [a == b for a, b in zip(runs[base][scenario][0]["texts"], runs[config][scenario][0]["texts"])]
    # each repeat ran both back to back: the ratio within a repeat is what drifting load disturbs least
    paired = sorted(a["metrics"]["tpot_ms"]["median"] / b["metrics"]["tpot_ms"]["median"]
                    for a, b in zip(runs[base][scenario], runs[config][scenario]))
    row.update({
        "baseline": base, "tpot_speedup_paired": paired[(len(paired) - 1) // 2], "tpot_speedup_paired_all": paired,
        "draft_tokens": draft_tokens, "accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
        "mean_accepted_per_draft": accepted / drafts if drafts else 0.0,
        "acceptance_per_pos": per_pos,
        "same_text": f"{sum(same)}/{len(same)}",
    })
    return row


_COLORS = {"off": "#999", "ngram": "#2a7", "draft": "#27c", "llama.cpp": "#caa", "llama.cpp-draft": "#c55",
           "llama.cpp-ngram": "#e93"}


def plot(summary: dict, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    scenarios = list(summary)
    configs = list(next(iter(summary.values())))
    width = 0.8 / len(configs)
    for k, c in enumerate(configs):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(scenarios))]
        ys = [summary[s][c]["tpot_ms"] for s in scenarios]
        ax.bar(xs, ys, width, label=c, color=_COLORS.get(c))
        for x, s in zip(xs, scenarios):
            r = summary[s][c]
            if "tpot_speedup_paired" in r:
                ax.text(x, r["tpot_ms"], f"{r['tpot_speedup_paired']:.2f}x", ha="center", va="bottom", fontsize=6,
                        rotation=90)
    ax.set_xticks(range(len(scenarios)), scenarios, fontsize=8)
    ax.set_ylabel("median TPOT (ms)")
    ax.set_title("Speculative decoding, SmolLM2-135M (speedup vs the same engine without)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    plt.close(fig)


def doc(data: dict, name: str) -> str:
    m = data["machine"]
    cmds = data["server_commands"]
    llama = f" llama.cpp: {m['llama_cpp']}." if "llama_cpp" in m else (
        " llama.cpp is not in this run: its server is not built on this machine "
        "(benchmarks/peers/build_llama_cpp.sh).")
    lines = [
        "## Speculative decoding", "",
        f"`python benchmarks/spec_decode.py` — servers with and without speculative decoding, streaming, greedy. "
        f"{m['date']}, {m['cpu']} ({m['isa']}), {m['cores']} cores shared with other work (load average before "
        f"{m['loadavg_before']}, after {m['loadavg_after']}), {data['args']['threads']} thread(s) per server, "
        f"torch {m['torch']}, inferd {m['inferd']}.{llama}", "",
        "Configurations (all adaptive where the engine has it): " + "; ".join(
            f"`{c}`: `{cmd}`" for c, cmd in cmds.items()) + ".", "",
        "Grounded: chat tasks over a text in the prompt (correct its spelling, rewrite it, copy its sentences "
        "about one subject, summarize it), up to 128 output tokens. Random: random-word completions, 64 output "
        "tokens (ignore_eos); the 135M model tends to repeat itself there, which prompt lookup also catches. "
        + ("Sampled: the same at temperature 1.0, where drafts almost never match: speculation has to switch "
           "itself off. " if "sampled-c16" in data["summary"] else "")
        + "Concurrency 1: 6 requests; 16: 16 requests. llama-server runs with 16 slots of 512 tokens and "
        "`--no-repack` (its AMX kernels stop with an illegal instruction on this machine's OS). "
        f"{data['args']['repeats']} repeats ({data['args']['llama_repeats']} of llama.cpp's); all servers up, one "
        "working at a time, each scenario on every server in turn, in alternating order.", "",
        "| scenario | configuration | TPOT (ms) | TPOT speedup vs the same engine without, paired (each repeat) "
        "| output tok/s | drafted | accepted | acceptance | accepted per position 1-8 | same text |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, by in data["summary"].items():
        for c, r in by.items():
            if "tpot_speedup_paired" not in r:
                lines.append(f"| {s} | {c} | {r['tpot_ms']:.1f} | (baseline) | {r['tok_s']:.1f} | | | | | |")
                continue
            pos = " / ".join(f"{p:.2f}" for p in r["acceptance_per_pos"])
            each = ", ".join(f"{x:.2f}" for x in r["tpot_speedup_paired_all"])
            lines.append(f"| {s} | {c} | {r['tpot_ms']:.1f} | **{r['tpot_speedup_paired']:.2f}x** ({each}) | "
                         f"{r['tok_s']:.1f} | {r['draft_tokens']:.0f} | {r['accepted_tokens']:.0f} | "
                         f"{r['acceptance_rate']:.2f} | {pos} | {r['same_text']} |")
    lines += ["", "TPOT of every run (ms): " + "; ".join(
        f"{c} {s}: {', '.join(f'{v:.1f}' for v in vs)}" for c, by in data["tpot_all_runs"].items()
        for s, vs in by.items()), "",
        "TPOT: the median over the repeats of each configuration; the speedup is the median of the per-repeat "
        "ratios to the same engine without speculation (run back to back), which drifting load from other work "
        "disturbs least. Acceptance per position k: drafts accepted at position k / request-steps that verified "
        "drafts (`spec_decode_num_accepted_tokens_per_pos / spec_decode_num_drafts`); drafted, accepted and "
        "acceptance are those of the median-TPOT run. Same text: answers identical to the run without "
        "speculation (first run of each; greedy answers part only at bf16 rounding near ties, "
        "docs/speculative_decoding.md; sampled ones are unseeded, so they differ by design).", "",
        f"![speculative decoding](../benchmarks/results/{name}.png)"]
    return "\n".join(lines)


def _display(cmd: list[str]) -> str:
    out = [Path(x).name if "/" in x else x for x in cmd]
    return " ".join("PORT" if i and out[i - 1] == "--port" else x for i, x in enumerate(out))


def _isa() -> str:
    from inferd.layers.cpu_isa import has_native_bf16
    label = "AVX2" if isa() == "avx2" else "AVX-512"
    return label + (" BF16 (bf16 weights)" if has_native_bf16() else " (float32 weights)")


if __name__ == "__main__":
    main()
