"""Offline throughput: inferd's engine vs transformers `generate`, same weights, same run.

N requests of random prompt tokens (seeded) and a fixed number of output tokens
(ignore_eos), greedy. inferd gets every request at once (continuous batching);
transformers runs them in batches of --hf-batch-size (equal prompt lengths, so no
padding is needed). Writes benchmarks/results/offline_throughput.json, a PNG plot
and the table in docs/benchmarks.md.

    python benchmarks/offline_throughput.py            # SmolLM2-135M, 64 requests
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine_info, random_prompts, save_json, write_doc_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_inferd(args, prompts) -> dict:
    from inferd import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, progress=False, max_num_seqs=args.max_num_seqs,
              num_threads=args.threads)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    return {"load_s": load_s, "elapsed_s": elapsed, "dtype": str(llm.engine.core.dtype)}


def run_transformers(args, prompts, dtype: torch.dtype) -> dict:
    """transformers' own Llama on exactly the weights inferd loaded (dequantized)."""
    import transformers

    from inferd.models.loader import load_checkpoint
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model, progress=False)
    config = transformers.AutoConfig.for_model(ckpt.config["model_type"], **{
        k: v for k, v in ckpt.config.items() if k != "model_type"})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(ckpt.tensors, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model = model.to(dtype).eval()
    load_s = time.perf_counter() - t0
    kw = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
              pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:2]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        for i in range(0, len(prompts), args.hf_batch_size):
            batch = torch.tensor(prompts[i:i + args.hf_batch_size])
            out = model.generate(batch, attention_mask=torch.ones_like(batch), **kw)
            assert out.shape[1] == batch.shape[1] + args.output_len
        elapsed = time.perf_counter() - t0
    return {"load_s": load_s, "elapsed_s": elapsed, "dtype": str(dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from inferd.engine.tokenizer import Tokenizer
    from inferd.models.loader import load_checkpoint
    ckpt = load_checkpoint(args.model, progress=False)
    tok = Tokenizer(ckpt.tokenizer)
    prompts = random_prompts(args.num_requests, args.input_len, tok.vocab_size, args.seed,
                             set(tok.special_token_ids))
    del ckpt

    results = {"inferd": run_inferd(args, prompts)}
    if not args.skip_transformers:
        dtype = {"auto": torch.bfloat16, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        results["transformers"] = run_transformers(args, prompts, dtype)
    n, out_len, in_len = args.num_requests, args.output_len, args.input_len
    for r in results.values():
        r["requests_per_s"] = n / r["elapsed_s"]
        r["output_tokens_per_s"] = n * out_len / r["elapsed_s"]
        r["total_tokens_per_s"] = n * (in_len + out_len) / r["elapsed_s"]
    data = {"args": vars(args), "machine": machine_info(), "results": results}
    save_json("offline_throughput", data)
    _plot(results)
    _doc(data)
    for name, r in results.items():
        print(f"{name:13s} {r['requests_per_s']:.2f} req/s  {r['output_tokens_per_s']:.1f} out tok/s  "
              f"{r['total_tokens_per_s']:.1f} total tok/s  ({r['elapsed_s']:.1f}s, {r['dtype']})")


def _plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(names, [results[k]["output_tokens_per_s"] for k in names], color=["#2a7", "#888"][:len(names)])
    ax.set_ylabel("output tokens/s")
    ax.set_title("Offline throughput, SmolLM2-135M, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(RESULTS / "offline_throughput.png", dpi=100)


def _doc(data: dict) -> None:
    a, m, res = data["args"], data["machine"], data["results"]
    rows = "\n".join(
        f"| {k} | {r['dtype']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
        f"{r['total_tokens_per_s']:.1f} | {r['elapsed_s']:.1f} |" for k, r in res.items())
    ratio = ""
    if "transformers" in res:
        ratio = (f"\ninferd / transformers output tokens/s: "
                 f"**{res['inferd']['output_tokens_per_s'] / res['transformers']['output_tokens_per_s']:.2f}x**\n")
    write_doc_section("offline_throughput", f"""## Offline throughput (engine vs transformers `generate`)

`python benchmarks/offline_throughput.py` — {a['num_requests']} requests, {a['input_len']} random prompt
tokens, {a['output_len']} output tokens each (greedy, ignore_eos); transformers in batches of
{a['hf_batch_size']}. {m['date']}, {m['cpu']}, {m['cores']} cores, {a['threads']} torch threads,
torch {m['torch']}, transformers {m['transformers']}, inferd {m['inferd']}.

| engine | dtype | requests/s | output tok/s | total tok/s | seconds |
|---|---|---|---|---|---|
{rows}
{ratio}
![offline throughput](../benchmarks/results/offline_throughput.png)
""")


if __name__ == "__main__":
    main()
