"""`inferd bench throughput` on the tiny Llama."""

from __future__ import annotations

import json

from inferd.bench.datasets import random_lengths
from inferd.cli.main import main


def test_bench_throughput(tiny_llama, tmp_path, capsys):
    out = tmp_path / "tp.json"
    rc = main(["bench", "throughput", "--model", str(tiny_llama), "--num-requests", "6", "--input-len", "12",
               "--output-len", "5", "--dtype", "float32", "--kv-cache-bytes", "16MiB", "--num-threads", "2",
               "--result-json", str(out)])
    assert rc == 0
    assert "output tokens/s" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["total_output_tokens"] == 30 and data["total_input_tokens"] == 72
    assert data["output_tokens_per_s"] > 0 and data["requests_per_s"] > 0


def test_bench_throughput_random_lengths(tiny_llama, tmp_path):
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--model", str(tiny_llama), "--num-requests", "8", "--input-len", "12",
                 "--output-len", "6", "--dataset-random", "--seed", "2", "--dtype", "float32",
                 "--kv-cache-bytes", "16MiB", "--num-threads", "2", "--result-json", str(out)]) == 0
    data = json.loads(out.read_text())
    # lengths drawn uniformly from len * [0.5, 1.5], seeded
    assert data["total_input_tokens"] == sum(random_lengths(8, 12, 0.5, seed=2))
    assert data["total_output_tokens"] == sum(random_lengths(8, 6, 0.5, seed=3))
