"""Serving metrics from per-request client-side timings.

Definitions follow vLLM's `benchmarks/benchmark_serving.py`, all measured by the
client (times in seconds here, milliseconds in the summary):

- TTFT (time to first token): arrival of the first chunk carrying output text
  minus the time the request was sent.
- E2EL (end-to-end latency): end of the response minus the time it was sent.
- TPOT (time per output token, first excluded): (E2EL - TTFT) / (output_tokens - 1),
  one value per request with more than one output token.
- ITL (inter-token latency): the gaps between consecutive chunks carrying text,
  pooled over all requests (a chunk carrying several tokens is one gap).
- Throughputs divide by the benchmark's wall time (first send to last response).
- Goodput: requests per second that met every given SLO (`ttft`, `tpot`, `e2el`, in
  ms); a request with at most one output token counts as TPOT 0, as vLLM does.

Percentiles are numpy's (linear interpolation between closest ranks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestResult:
    """What the client saw of one request."""

    success: bool = False
    prompt_len: int = 0            # prompt tokens (server's usage if it reported them)
    output_tokens: int = 0         # completion tokens (server's usage if it reported them)
    ttft: float = 0.0              # seconds
    e2el: float = 0.0              # seconds
    itl: list[float] = field(default_factory=list)  # seconds between text chunks
    start: float = 0.0             # perf_counter at send, relative to the benchmark start
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output_tokens - 1); None with at most one output token."""
        if self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_dict(self, with_text: bool = False) -> dict:
        d = asdict(self)
        if not with_text:
            d.pop("generated_text")
        d["tpot"] = self.tpot
        return d


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput: expected KEY:MS with KEY in {', '.join(SLO_KEYS)}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput: {item!r}: the SLO must be positive")
        slos[key] = ms
    return slos


def summarize(values_s: list[float], percentiles=DEFAULT_PERCENTILES) -> dict[str, float]:
    """mean, median, std and percentiles of `values_s` (seconds), in milliseconds; zeros if empty."""
    arr = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(arr, p))
    return out


def is_good(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    """A successful request meeting every SLO (a request with <= 1 token has TPOT 0)."""
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
    return all(values[k] * 1000.0 <= slo for k, slo in slos_ms.items())


def compute_metrics(results: list[RequestResult], duration_s: float,
                    goodput_slos_ms: dict[str, float] | None = None,
                    percentiles=DEFAULT_PERCENTILES) -> dict:
    """The benchmark summary: counts, throughputs, latency statistics (ms), goodput."""
    if duration_s <= 0:
        raise ValueError("duration_s must be positive")
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    e2els = [r.e2el for r in ok]
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    itls = [gap for r in ok for gap in r.itl]
    out = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "ttft_ms": summarize(ttfts, percentiles),
        "tpot_ms": summarize(tpots, percentiles),
        "itl_ms": summarize(itls, percentiles),
        "e2el_ms": summarize(e2els, percentiles),
    }
    if goodput_slos_ms:
        good = sum(is_good(r, goodput_slos_ms) for r in results)
        out["goodput"] = {"slos_ms": dict(goodput_slos_ms), "good_requests": good,
                          "request_goodput": good / duration_s}
    return out


def format_report(m: dict, title: str = "Serving Benchmark Result") -> str:
    """A plain-text table of `compute_metrics`' summary, vLLM style."""
    w = 50
    lines = [f" {title} ".center(w, "=")]

    def row(name: str, value) -> None:
        lines.append(f"{name:<40}{value:>10.2f}" if isinstance(value, float) else f"{name:<40}{value:>10}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    if "goodput" in m:
        row("Request goodput (req/s):", m["goodput"]["request_goodput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                      ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        lines.append(f" {name} ".center(w, "-"))
        short = key.split("_")[0].upper()
        for stat, value in m[key].items():
            if stat in ("std", "p50"):  # p50 is the median
                continue
            label = stat.capitalize() if stat in ("mean", "median") else stat.upper()
            row(f"{label} {short} (ms):", value)
    lines.append("=" * w)
    return "\n".join(lines)
