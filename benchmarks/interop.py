"""Interop check: LangChain's ChatOpenAI and lm-eval's local-completions against `inferd serve`.

The two client packages are not inferd dependencies (CI does not run this); install them first:

    pip install "langchain-openai>=1.0,<2" "lm-eval>=0.4.9,<0.5"

Then, from anywhere (the script works from the repo root):

    python benchmarks/interop.py

What it does:

1. starts `python -m inferd.cli serve` (the embedded SmolLM2-135M-Instruct model, no model
   argument) on a free loopback port and waits for `GET /health`;
2. LangChain (`langchain_openai.ChatOpenAI`, base_url http://127.0.0.1:PORT/v1, any key):
   `invoke` (system + user message), `stream` (with `stream_usage=True`) and a `batch` of
   3 prompts, all greedy;
3. lm-eval (`local-completions`, base_url http://127.0.0.1:PORT/v1/completions) on
   `benchmarks/interop_task/` (10 one-line facts, 4 choices each: 40 LOGLIKELIHOOD
   requests, i.e. `/v1/completions` with `echo: true` and `logprobs`), three ways:
   token ids sent 4 at a time concurrently (lm-eval's default for a local tokenizer),
   text (`tokenized_requests=False`), and token ids 8 prompts per request (`batch_size=8`).
   lm-eval needs a tokenizer for loglikelihood (it computes the context length itself):
   offline there is no hub, so the script gives it the served GGUF's tokenizer, converted
   by transformers (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) into a local dir.
   With network access `tokenizer=HuggingFaceTB/SmolLM2-135M-Instruct` does the same.
4. prints the results, writes benchmarks/results/interop.json and stops the server (SIGTERM).

docs/interop.md shows a run's output.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "benchmarks" / "interop_task"
TASK = "inferd_interop_facts"

# No hub: datasets builds the task from the local JSONL, transformers reads a local dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_server(port: int, log_path: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "inferd.cli", "serve", "--port", str(port), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if get_json(base + "/health").get("status") == "ok":
                return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no healthy server after {timeout}s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# ---------------------------------------------------------------- LangChain

def run_langchain(base_url: str, model: str) -> dict:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=base_url, api_key="unused",
                     temperature=0, max_tokens=48, stream_usage=True)
    out: dict = {}

    print("\n== LangChain ChatOpenAI ==", flush=True)
    t = time.perf_counter()
    msg = llm.invoke([SystemMessage("You are a concise assistant."),
                      HumanMessage("What is the capital of France?")])
    out["invoke"] = {"content": msg.content, "finish_reason": msg.response_metadata.get("finish_reason"),
                     "model_name": msg.response_metadata.get("model_name"),
                     "usage_metadata": msg.usage_metadata, "seconds": round(time.perf_counter() - t, 3)}
    print(f"invoke -> {msg.content!r}\n  finish_reason={out['invoke']['finish_reason']} "
          f"usage={msg.usage_metadata}")

    t = time.perf_counter()
    pieces, first, usage, finish = [], None, None, None
    print("stream -> ", end="", flush=True)
    for chunk in llm.stream("Name three colors."):
        if chunk.content:
            first = first if first is not None else time.perf_counter() - t
            pieces.append(chunk.content)
            print(chunk.content, end="", flush=True)
        usage = chunk.usage_metadata or usage
        finish = chunk.response_metadata.get("finish_reason") or finish
    print()
    out["stream"] = {"content": "".join(pieces), "content_chunks": len(pieces), "finish_reason": finish,
                     "usage_metadata": usage, "first_chunk_s": round(first or 0.0, 3),
                     "seconds": round(time.perf_counter() - t, 3)}
    print(f"  {len(pieces)} content chunks, finish_reason={finish} usage={usage}")

    prompts = ["What is 2 + 2?", "Name a fruit that is yellow.", "Translate 'thank you' to French."]
    t = time.perf_counter()
    msgs = llm.batch(prompts)
    out["batch"] = {"prompts": prompts, "contents": [m.content for m in msgs],
                    "finish_reasons": [m.response_metadata.get("finish_reason") for m in msgs],
                    "seconds": round(time.perf_counter() - t, 3)}
    for p, m in zip(prompts, msgs):
        print(f"batch {p!r} -> {m.content!r}")
    return out


# ---------------------------------------------------------------- lm-eval

def local_tokenizer(model_root: str, dest: Path) -> str:
    """A directory lm-eval can load with AutoTokenizer: the served checkpoint's tokenizer."""
    root = Path(model_root)
    if root.is_dir():
        return str(root)                           # an HF model dir has its tokenizer files
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(root.parent), gguf_file=root.name)
    tok.save_pretrained(dest)
    return str(dest)


LM_EVAL_RUNS = {
    # name: (extra model_args, batch_size)
    "token ids, 4 concurrent": ({"num_concurrent": 4}, 1),
    "text (tokenized_requests=False), 4 concurrent": ({"num_concurrent": 4, "tokenized_requests": False}, 1),
    "token ids, batch_size=8": ({"num_concurrent": 1}, 8),
}


def run_lm_eval(completions_url: str, model: str, tokenizer: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    tm = TaskManager(include_path=str(TASK_DIR))
    runs = {}
    for name, (extra, batch_size) in LM_EVAL_RUNS.items():
        args = {"model": model, "base_url": completions_url, "tokenizer": tokenizer,
                "tokenizer_backend": "huggingface", "max_retries": 3, **extra}
        model_args = ",".join(f"{k}={v}" for k, v in args.items())
        print(f"\n== lm-eval local-completions: {name} ==\nmodel_args: {model_args}  batch_size: {batch_size}",
              flush=True)
        t = time.perf_counter()
        res = simple_evaluate(model="local-completions", model_args=model_args, tasks=[TASK],
                              task_manager=tm, batch_size=batch_size, log_samples=True)
        secs = time.perf_counter() - t
        print(make_table(res))
        r = res["results"][TASK]
        docs = []
        for s in sorted(res["samples"][TASK], key=lambda s: s["doc_id"]):
            lls = [round(float(x[0]), 4) for x in s["filtered_resps"]]
            docs.append({"question": s["doc"]["question"], "target": s["doc"]["choices"][s["doc"]["answer"]],
                         "predicted": s["doc"]["choices"][max(range(len(lls)), key=lls.__getitem__)],
                         "loglikelihoods": lls, "acc": s["acc"]})
        runs[name] = {"model_args": model_args, "batch_size": batch_size, "seconds": round(secs, 2),
                      "acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"],
                      "acc_norm": r["acc_norm,none"], "acc_norm_stderr": r["acc_norm_stderr,none"],
                      "table": make_table(res), "docs": docs}
    first = next(iter(runs.values()))
    print("\nper question (loglikelihood of each choice; first run):")
    for d in first["docs"]:
        mark = "ok " if d["acc"] else "BAD"
        print(f"  {mark} {d['question']!r}: predicted {d['predicted']!r}, target {d['target']!r}  "
              f"{d['loglikelihoods']}")
    # The runs send the same requests in different shapes: the scores should agree.
    ref = [ll for d in first["docs"] for ll in d["loglikelihoods"]]
    for name, run in runs.items():
        got = [ll for d in run["docs"] for ll in d["loglikelihoods"]]
        run["max_abs_diff_vs_first_run"] = round(max(abs(a - b) for a, b in zip(ref, got)), 4)
    print("\nacc per run: " + "; ".join(
        f"{n}: acc {r['acc']:.2f}, acc_norm {r['acc_norm']:.2f}, "
        f"max |dLL| vs first {r['max_abs_diff_vs_first_run']}" for n, r in runs.items()))
    return runs


def versions() -> dict:
    out = {}
    for dist in ["inferd", "langchain-openai", "langchain-core", "openai", "lm_eval", "datasets",
                 "transformers", "torch"]:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["python"] = sys.version.split()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=None, help="default: a free loopback port")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for `inferd serve` (repeatable), e.g. --server-arg=--num-threads=2")
    ap.add_argument("--skip-langchain", action="store_true")
    ap.add_argument("--skip-lm-eval", action="store_true")
    args = ap.parse_args()
    os.chdir(ROOT)                               # the task's data_files path is relative to the repo root

    from benchmarks.common import machine_info, save_json

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="inferd-interop-") as tmp:
        log_path = Path(tmp) / "server.log"
        proc = start_server(port, log_path, args.server_arg)
        result: dict = {"machine": machine_info(), "versions": versions(), "port": port}
        try:
            result["startup_s"] = round(wait_healthy(proc, base, log_path), 2)
            model_card = get_json(base + "/v1/models")["data"][0]
            model = model_card["id"]
            print(f"server healthy after {result['startup_s']} s; serving {model!r}")
            print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
            result["model"] = model
            if not args.skip_langchain:
                result["langchain"] = run_langchain(base + "/v1", model)
            if not args.skip_lm_eval:
                tok = local_tokenizer(model_card["root"], Path(tmp) / "tokenizer")
                result["lm_eval"] = run_lm_eval(base + "/v1/completions", model, tok)
        finally:
            result["server_exit_code"] = stop_server(proc)
            print(f"\nserver stopped (exit code {result['server_exit_code']})")
            if result["server_exit_code"] != 0:
                print(log_path.read_text()[-3000:])
    path = save_json("interop", result)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
