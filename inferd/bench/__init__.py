"""Benchmark tools: `inferd bench throughput` (offline) and `inferd bench serve` (online).

- `metrics`: per-request timings -> throughput, TTFT/TPOT/ITL/E2E percentiles, goodput
  (the definitions of vLLM's `benchmarks/benchmark_serving.py`).
- `datasets`: seeded random prompts, as token ids (offline) or as text (online).
- `throughput`: the offline benchmark on `inferd.LLM`.
- `serve`: the online benchmark against any OpenAI-compatible server (inferd,
  llama.cpp's llama-server, vLLM), streaming over httpx.
- `cli`: the `inferd bench` argument parsers.
"""
