"""`inferd bench throughput`: offline throughput of the engine through `inferd.LLM`.

N requests of seeded random token ids, all given to the engine at once (it
batches them continuously), greedy, each generating exactly its output length
(`ignore_eos`). By default every request has `--input-len` prompt tokens and
`--output-len` output tokens; `--dataset-random` draws each request's lengths
uniformly from [len * (1 - r), len * (1 + r)] with r = `--range-ratio` (seeded).
A short warm-up runs first and is not timed. Reports requests/s, output tokens/s
and total (prompt + output) tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from inferd.bench.datasets import random_lengths, random_token_prompts


def run(args: argparse.Namespace, engine_config) -> dict:
    from inferd import LLM, SamplingParams

    config = engine_config(args, args.model)
    config.progress = False
    t0 = time.perf_counter()
    llm = LLM(**vars(config))
    load_s = time.perf_counter() - t0
    tok = llm.tokenizer
    n = args.num_requests
    if args.dataset_random:
        in_lens = random_lengths(n, args.input_len, args.range_ratio, args.seed)
        out_lens = random_lengths(n, args.output_len, args.range_ratio, args.seed + 1)
    else:
        in_lens, out_lens = [args.input_len] * n, [args.output_len] * n
    prompts = random_token_prompts(n, in_lens, tok.vocab_size, args.seed, set(tok.special_token_ids))
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in out_lens]

    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0

    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    num_in = sum(len(p) for p in prompts)
    if num_out != sum(out_lens):
        print(f"warning: {num_out} output tokens, expected {sum(out_lens)}", file=sys.stderr)
    return {
        "model": args.model or "default (SmolLM2-135M-Instruct Q4_1)",
        "num_requests": n, "total_input_tokens": num_in, "total_output_tokens": num_out,
        "elapsed_s": elapsed, "load_s": load_s,
        "requests_per_s": n / elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_in + num_out) / elapsed,
        "dtype": str(getattr(getattr(llm.engine, "core", None), "dtype", config.dtype)),
        "num_threads": config.threads(),
    }


def main(args: argparse.Namespace, engine_config) -> int:
    """`engine_config(args, model)` builds the engine's config from the command line's flags."""
    if args.num_requests < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-requests, --input-len and --output-len must be at least 1")
    result = run(args, engine_config)
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, "
          f"{result['output_tokens_per_s']:.1f} output tokens/s, "
          f"{result['total_tokens_per_s']:.1f} total tokens/s "
          f"({result['num_requests']} requests, {result['total_input_tokens']} prompt + "
          f"{result['total_output_tokens']} output tokens in {result['elapsed_s']:.2f} s, "
          f"{result['dtype']}, {result['num_threads']} threads)")
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"args": _jsonable(vars(args)), **result}, indent=2))
    return 0


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
