"""Offline embeddings/s: inferd's `Embedder` vs sentence-transformers' `encode`, same model.

Both run the bundled all-MiniLM-L6-v2 (fp32) on the same seeded texts (sentences of
4 to 96 words drawn from the model's own vocabulary, so lengths vary as real inputs
do) with the same torch thread count, in the same process, one after the other.
Batch size 1 embeds one text per call; batch size 64 hands 64 texts per call
(`encode(..., batch_size=64)`). Each measurement is the median of --repeats runs
after a warm-up, runs of the two alternating; the vectors of the two are compared (minimum cosine similarity).
Writes benchmarks/results/embeddings.json and the table in docs/benchmarks.md.

    python benchmarks/embeddings.py

Each system is a `Runner`: a name and a function embedding one batch of texts.
HTTP hook: a runner for a served model (POST /v1/embeddings, one request per batch)
plugs in as one more entry of `runners` in `main()`, timed by the same `measure`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, save_json, write_doc_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Runner:
    name: str
    embed: Callable[[list[str]], np.ndarray]  # texts -> float32 [len(texts), dim]


def make_texts(n: int, seed: int, vocab: list[str]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocab, k=rng.randint(4, 96))).capitalize() + "." for _ in range(n)]


def measure(runners: list[Runner], texts: list[str], batch_size: int, repeats: int) -> dict[str, dict]:
    """Median embeddings/s of each runner over `repeats` passes over `texts` in batches
    of `batch_size`. Passes alternate between runners, so load from other processes
    on a shared machine falls on both alike."""
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for r in runners:
        r.embed(batches[0])  # warm-up
    for _ in range(repeats):
        for r in runners:
            t0 = time.perf_counter()
            for b in batches:
                r.embed(b)
            times[r.name].append(time.perf_counter() - t0)
    return {name: {"embeddings_per_s": len(texts) / statistics.median(ts), "seconds": statistics.median(ts),
                   "all_seconds": ts} for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-texts-bs1", type=int, default=128, help="texts embedded one per call")
    ap.add_argument("--num-texts-bs64", type=int, default=512, help="texts embedded 64 per call")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from inferd.engine.embedding.embedder import Embedder
    from inferd.models.default_embedding_model import default_embedding_model_path

    ours = Embedder(num_threads=args.threads, dtype="float32")
    st = SentenceTransformer(str(default_embedding_model_path()), device="cpu")
    assert torch.get_num_threads() == args.threads
    vocab = [w for w in (default_embedding_model_path() / "vocab.txt").read_text().split()
             if w.isalpha() and w.isascii() and len(w) > 2]
    texts = make_texts(max(args.num_texts_bs1, args.num_texts_bs64), args.seed, vocab)
    tokens = ours.embed(texts).num_tokens

    runners = [
        Runner("inferd", lambda b: ours.embed(b).vectors),
        Runner("sentence-transformers", lambda b: st.encode(b, batch_size=len(b), convert_to_numpy=True)),
    ]
    a, b = (r.embed(texts[:256]) for r in runners)
    min_cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())

    load_start = float(open("/proc/loadavg").read().split()[0])
    results = {}
    for bs, n in ((1, args.num_texts_bs1), (64, args.num_texts_bs64)):
        for name, res in measure(runners, texts[:n], bs, args.repeats).items():
            res["tokens_per_s"] = sum(tokens[:n]) / res["seconds"]
            results[f"{name}@{bs}"] = res
            print(f"{name:22s} batch {bs:3d}: {res['embeddings_per_s']:8.1f} embeddings/s "
                  f"({res['tokens_per_s']:.0f} tokens/s)", flush=True)
    load_end = float(open("/proc/loadavg").read().split()[0])
    import sentence_transformers
    data = {"args": vars(args), "machine": machine_info(), "load_1min": [load_start, load_end],
            "sentence_transformers": sentence_transformers.__version__,
            "mean_tokens_per_text": statistics.mean(tokens), "min_cosine_similarity": min_cos,
            "results": results}
    save_json("embeddings", data)
    _doc(data)


def _doc(data: dict) -> None:
    m, res, args = data["machine"], data["results"], data["args"]
    noisy = (" — other processes shared the cores, so the numbers are noisy (runs of the two alternate,"
             " so both were slowed alike)") if max(data["load_1min"]) > 1.0 else ""
    rows = []
    for bs in (1, 64):
        ours, theirs = res[f"inferd@{bs}"], res[f"sentence-transformers@{bs}"]
        rows.append(f"| {bs} | {ours['embeddings_per_s']:.1f} | {theirs['embeddings_per_s']:.1f} "
                    f"| {ours['embeddings_per_s'] / theirs['embeddings_per_s']:.2f}x |")
    write_doc_section("embeddings", f"""## Offline embeddings (inferd `Embedder` vs sentence-transformers)

`python benchmarks/embeddings.py` — all-MiniLM-L6-v2 (fp32), seeded texts of 4-96 words
({data['mean_tokens_per_text']:.0f} tokens on average, special tokens included); batch size 1:
{args['num_texts_bs1']} calls of one text, batch size 64: {args['num_texts_bs64']} texts, 64 per call;
median of {args['repeats']} runs. {m['date']}, {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads,
torch {m['torch']}, transformers {m['transformers']}; 1-minute load average {data['load_1min'][0]:.2f} at the
start, {data['load_1min'][1]:.2f} at the end{noisy}. sentence-transformers {data['sentence_transformers']}.
The vectors agree: minimum cosine similarity {data['min_cosine_similarity']:.6f}.

| batch size | inferd embeddings/s | sentence-transformers embeddings/s | inferd / s-t |
|---|---|---|---|
{chr(10).join(rows)}
""")


if __name__ == "__main__":
    main()
