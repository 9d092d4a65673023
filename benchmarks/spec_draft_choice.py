"""Which draft the embedded model could use without a second download: its own weights at int4, or its first
layers with the tied head (layer skip)? Acceptance per unit of cost, measured offline.

For a greedy draft, the chance that draft position j is accepted given the drafts
before it were is the chance that the draft's argmax equals the target's at that
position, given the right context. So each draft is scored by teacher forcing: the
target (bf16) writes greedy answers to the input-grounded prompts of
benchmarks/spec_decode.py; each draft then reads prompt + answer and predicts every
answer position; the agreement rate a is its per-token acceptance rate, and
a + a^2 + ... + a^k the expected tokens it adds to a verification step with k drafts.
Cost: the median time of one decode step of the draft alone (one request), relative
to the target's. Writes benchmarks/results/spec_draft_choice.json and the
`spec_draft_choice` section of docs/benchmarks.md.

    python benchmarks/spec_draft_choice.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, save_json, write_doc_section  # noqa: E402
from benchmarks.spec_decode import grounded_prompts  # noqa: E402
from inferd import LLM, SamplingParams  # noqa: E402
from inferd.layers.attention import AttentionMetadata  # noqa: E402

CHUNK = 16  # teacher forcing in chunks of this many rows, so int4 copies serve them (layers/linear.py)


def greedy_predictions(llm: LLM, ids: list[int], num_layers: int | None = None) -> list[int]:
    """The model's argmax after every prefix of ids, computed chunk by chunk on a scratch cache."""
    core = llm.engine.core
    model, runner = core.model, core.runner
    layers = model.layers
    if num_layers is not None:
        model.layers = layers[:num_layers]
    bs = runner.block_size
    nblocks = -(-len(ids) // bs)
    caches = [torch.zeros_like(c[:, :nblocks]) for c in runner.kv_caches]
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                n = len(chunk)
                meta = AttentionMetadata(torch.arange(start, start + n), [n], [start + n],
                                         torch.arange(nblocks).unsqueeze(0))
                runner.backend.prepare(meta, torch.device("cpu"))
                hidden = model(torch.tensor(chunk), torch.arange(start, start + n), caches, meta, runner.backend)
                out += model.compute_logits(hidden).float().argmax(-1).tolist()
    finally:
        model.layers = layers
    return out


def step_ms(llm: LLM, prompt: list[int], num_layers: int | None = None, steps: int = 40) -> float:
    """Median engine step time while one request decodes, with the first num_layers layers only."""
    core = llm.engine.core
    model = core.model
    layers = model.layers
    if num_layers is not None:
        model.layers = layers[:num_layers]
    model.__dict__.pop("_cpu_decode_layers", None)  # the one-call decode path caches its layer list
    try:
        engine = llm.engine
        engine.add_request("t", prompt, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
        engine.step()  # prefill
        times = []
        while engine.has_unfinished:
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000
    finally:
        model.layers = layers
        model.__dict__.pop("_cpu_decode_layers", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--layers", default="8,15,22", help="layer-skip depths to score")
    ap.add_argument("--k", type=int, default=4, help="draft length for the expected tokens per step")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    target = LLM(progress=False, num_threads=args.threads)
    int4 = LLM(progress=False, num_threads=args.threads, quantization="int4")
    tok = target.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p.text}]) for p in grounded_prompts(args.prompts, 77)]
    answers = [o.outputs[0].token_ids for o in target.generate(
        prompts, SamplingParams(temperature=0, max_tokens=96))]

    def agreement(llm, num_layers=None) -> float:
        hits = total = 0
        for p, a in zip(prompts, answers):
            pred = greedy_predictions(llm, p + a, num_layers)
            # position len(p) - 1 + i predicts answer token i
            hits += sum(pred[len(p) - 1 + i] == t for i, t in enumerate(a))
            total += len(a)
        return hits / total

    base_ms = step_ms(target, prompts[0])
    drafts = {"int4 (same weights)": (int4, None)}
    drafts.update({f"layer skip: first {n} of 30 layers + tied head": (target, n)
                   for n in map(int, args.layers.split(","))})
    rows = {}
    for name, (llm, n) in drafts.items():
        a = agreement(llm, n)
        ms = step_ms(llm, prompts[0], n)
        gain = sum(a ** j for j in range(1, args.k + 1))
        rows[name] = {"acceptance": a, "step_ms": ms, "cost_vs_target": ms / base_ms,
                      "expected_extra_tokens_k": gain, "extra_tokens_per_target_step_of_cost": gain / (
                          args.k * ms / base_ms)}
        print(name, rows[name], flush=True)
    m = machine_info()
    data = {"args": vars(args), "machine": m, "target_step_ms": base_ms, "drafts": rows}
    save_json("spec_draft_choice", data)
    if not args.no_doc:
        write_doc_section("spec_draft_choice", doc(data))


def doc(data: dict) -> str:
    m, k = data["machine"], data["args"]["k"]
    lines = [
        "## Draft choice for the embedded model (speculative decoding)", "",
        f"`python benchmarks/spec_draft_choice.py` — greedy drafts scored by teacher forcing on the target's "
        f"(bf16) greedy answers to {data['args']['prompts']} input-grounded prompts (those of "
        f"`benchmarks/spec_decode.py`); acceptance = the draft's argmax equals the target's. Cost: median "
        f"decode step of the draft alone, one request, vs the target's {data['target_step_ms']:.1f} ms. "
        f"{m['date']}, {m['cpu']}, {data['args']['threads']} thread(s), shared machine.", "",
        f"| draft | acceptance | step (ms) | cost vs target | expected extra tokens, {k} drafts "
        "| extra tokens per target step of draft cost |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in data["drafts"].items():
        lines.append(f"| {name} | {r['acceptance']:.2f} | {r['step_ms']:.1f} | {r['cost_vs_target']:.2f} | "
                     f"{r['expected_extra_tokens_k']:.2f} | {r['extra_tokens_per_target_step_of_cost']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
