"""Serving metrics on synthetic timings: percentiles, TPOT, ITL pooling, goodput, throughputs."""

from __future__ import annotations

import numpy as np
import pytest

from inferd.bench.metrics import RequestResult, compute_metrics, format_report, parse_goodput, summarize


def req(ttft, e2el, out, itl=(), prompt=10, ok=True):
    return RequestResult(success=ok, prompt_len=prompt, output_tokens=out, ttft=ttft, e2el=e2el, itl=list(itl))


def test_tpot_excludes_the_first_token():
    r = req(ttft=0.5, e2el=2.5, out=5)
    assert r.tpot == pytest.approx(0.5)          # (2.5 - 0.5) / (5 - 1)
    assert req(ttft=0.5, e2el=0.5, out=1).tpot is None
    assert req(ttft=0.5, e2el=0.5, out=0).tpot is None


def test_summarize_percentiles_in_ms():
    s = summarize([0.001 * v for v in range(1, 101)], percentiles=(50, 90, 99))  # 1..100 ms
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)       # linear interpolation, as numpy/vLLM
    assert s["p99"] == pytest.approx(99.01)
    assert s["std"] == pytest.approx(np.std(np.arange(1, 101)))
    assert summarize([]) == {"mean": 0.0, "median": 0.0, "std": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_compute_metrics_counts_throughputs_and_latencies():
    results = [
        req(0.1, 1.1, 11, itl=[0.1] * 10, prompt=100),
        req(0.3, 2.3, 5, itl=[0.5] * 4, prompt=50),
        req(0.0, 0.0, 0, ok=False),
    ]
    m = compute_metrics(results, duration_s=2.5)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 150 and m["total_output_tokens"] == 16
    assert m["request_throughput"] == pytest.approx(2 / 2.5)
    assert m["output_throughput"] == pytest.approx(16 / 2.5)
    assert m["total_token_throughput"] == pytest.approx(166 / 2.5)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["tpot_ms"]["mean"] == pytest.approx((100.0 + 500.0) / 2)   # 1.0/10 and 2.0/4
    assert m["e2el_ms"]["median"] == pytest.approx(1700.0)
    # ITL pools every gap of every request: 10 x 100 ms and 4 x 500 ms
    assert m["itl_ms"]["mean"] == pytest.approx((10 * 100 + 4 * 500) / 14)
    assert m["itl_ms"]["median"] == pytest.approx(100.0)
    assert "goodput" not in m


def test_goodput_counts_requests_meeting_every_slo():
    results = [
        req(0.1, 1.1, 11),   # ttft 100 ms, tpot 100 ms, e2el 1100 ms
        req(0.6, 1.6, 11),   # ttft 600 ms
        req(0.1, 3.1, 11),   # tpot 300 ms
        req(0.2, 0.2, 1),    # one token: tpot counts as 0
        req(0.0, 0.0, 0, ok=False),
    ]
    m = compute_metrics(results, 2.0, {"ttft": 500, "tpot": 150})
    assert m["goodput"]["good_requests"] == 2
    assert m["goodput"]["request_goodput"] == pytest.approx(1.0)
    m = compute_metrics(results, 2.0, {"e2el": 1500})
    assert m["goodput"]["good_requests"] == 2       # 1100 ms and 200 ms
    assert compute_metrics(results, 2.0, {"ttft": 100})["goodput"]["good_requests"] == 2  # SLO inclusive


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 2000.0}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:fast"], ["tpot:0"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_all_failed_and_bad_duration():
    m = compute_metrics([req(0, 0, 0, ok=False)], 1.0)
    assert m["completed"] == 0 and m["output_throughput"] == 0 and m["ttft_ms"]["p99"] == 0
    with pytest.raises(ValueError):
        compute_metrics([], 0.0)


def test_report_names_every_metric():
    text = format_report(compute_metrics([req(0.1, 1.1, 11, itl=[0.1] * 10)], 1.0, {"ttft": 500}))
    for label in ("Request throughput", "Request goodput", "Output token throughput", "Mean TTFT (ms):",
                  "Median TPOT (ms):", "P99 ITL (ms):", "P90 E2EL (ms):"):
        assert label in text
