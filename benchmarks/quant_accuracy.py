"""Accuracy cost of lossy options: perplexity on a fixed text against the float reference.

The text is a fixed English passage (below). Perplexity comes from one forward
pass over it (teacher forcing). For int8 and int4, the weight-only kernels are
forced for every matmul of the pass (normally they only serve batches of a few
rows), so the number measures their rounding, not which path a batch took.
Writes benchmarks/results/quant_accuracy.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import inferd.layers.linear as linear  # noqa: E402
from benchmarks.common import machine_info, save_json, write_doc_section  # noqa: E402
from inferd import LLM, SamplingParams  # noqa: E402


TEXT = """The history of the printing press begins in the fifteenth century, when Johannes
Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from
those used to make wine. Before his invention, books were copied by hand, a slow and
expensive process that kept written knowledge in the hands of a few monasteries,
universities and wealthy patrons. Within fifty years of the first printed Bible,
presses were operating in more than two hundred cities across Europe, and millions of
books had been produced. The consequences were profound. Scholars could compare
identical copies of a text, errors could be corrected in later editions, and new ideas
travelled faster than any authority could suppress them. Printed pamphlets fuelled the
Reformation, scientific journals allowed researchers to build on each other's results,
and cheap almanacs brought weather lore, calendars and practical advice to farmers and
merchants. Literacy rose slowly but steadily, first among the urban middle classes and
later throughout society, as schools adopted printed primers and grammars. Historians
still debate how much the press caused these changes and how much it merely
accelerated trends already under way, but few doubt that it transformed the way
people learned, argued and remembered."""


# (row, LLM options); GGUF rows compare with float32, the dequantized weights they hold
OPTIONS = (
    ("float32", dict(dtype="float32")), ("bfloat16", dict(dtype="bfloat16")),
    ("GGUF blocks (the default: two int8 activation terms)", dict()),
    ("GGUF blocks, `--quantization gguf-q8` (one term, as llama.cpp)", dict(quantization="gguf-q8")),
    ("GGUF blocks + int8 KV cache", dict(kv_cache_dtype="int8")),
    ("bfloat16 + int8 weights", dict(dtype="bfloat16", quantization="int8")),
    ("bfloat16 + int4 weights (output head int8)", dict(dtype="bfloat16", quantization="int4")),
    ("bfloat16 + int8 KV cache", dict(dtype="bfloat16", kv_cache_dtype="int8")),
    ("float32 + int8 KV cache", dict(dtype="float32", kv_cache_dtype="int8")),
)


def perplexity(llm: LLM, ids: list[int]) -> float:
    [out] = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))
    lps = [next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]]
    return math.exp(-sum(lps) / len(lps))


def main() -> None:
    results = {}
    for name, opts in OPTIONS:
        llm = LLM(progress=False, **opts)
        ids = llm.tokenizer.encode(TEXT)
        saved = linear.INT8_MAX_ROWS, linear.INT4_MAX_ROWS
        # force the quantized kernels where they are enabled
        linear.INT8_MAX_ROWS = linear.INT4_MAX_ROWS = 1 << 30
        try:
            results[name] = perplexity(llm, ids)
        finally:
            linear.INT8_MAX_ROWS, linear.INT4_MAX_ROWS = saved
        del llm
    m = machine_info()

    def ref(name: str) -> tuple[str, float]:  # each option against the plain run of its dtype
        base = "float32" if name.startswith("GGUF") else name.split()[0]
        return base, results[base]

    rows = "\n".join(f"| {k} | {v:.3f} | {100 * (v / ref(k)[1] - 1):+.2f}% vs {ref(k)[0]} |"
                      for k, v in results.items())
    save_json("quant_accuracy", {"machine": m, "tokens": len(ids), "perplexity": results})
    write_doc_section("quant_accuracy", f"""## Accuracy of lossy options

`python benchmarks/quant_accuracy.py` — perplexity of SmolLM2-135M-Instruct (weights as
dequantized from its Q4_1 GGUF) on a fixed {len(ids)}-token English passage, one
teacher-forced pass (with an int8 KV cache every position attends to the int8 K/V of the
positions before it). The GGUF rows compute with the file's own blocks
(layers/quant_blocks.py) and compare with float32 on the weights those blocks hold, the others
with the plain run of their dtype; {m['date']}, {m['cpu']} ({m['isa']}), torch {m['torch']}.

| option | perplexity | change |
|---|---|---|
{rows}
""")
    print(results)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
