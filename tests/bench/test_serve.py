"""`inferd bench serve` end to end against a real `inferd serve` of the tiny Llama."""

from __future__ import annotations

import json

import pytest

from inferd.cli.main import main
from tests.api.conftest import API_KEY, MODEL, ServerProc


@pytest.fixture(scope="module")
def bench_server(tiny_llama):
    srv = ServerProc(tiny_llama).wait_ready()
    yield srv
    srv.stop()


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_serve_against_inferd(bench_server, tiny_llama, tmp_path, capsys, endpoint):
    out = tmp_path / "result.json"
    rc = main(["bench", "serve", "--base-url", bench_server.url, "--model", MODEL, "--api-key", API_KEY,
               "--endpoint", endpoint, "--num-prompts", "4", "--input-len", "24", "--output-len", "8",
               "--max-concurrency", "2", "--seed", "3", "--tokenizer", str(tiny_llama),
               "--goodput", "ttft:60000", "tpot:60000", "--result-json", str(out)])
    assert rc == 0
    report = capsys.readouterr().out
    assert "Successful requests:" in report and "Median TPOT (ms):" in report

    data = json.loads(out.read_text())
    m = data["metrics"]
    assert m["completed"] == 4 and m["failed"] == 0
    assert m["total_output_tokens"] == 4 * 8               # ignore_eos honoured, counted from usage
    assert m["goodput"]["good_requests"] == 4
    assert m["output_throughput"] > 0 and m["ttft_ms"]["p99"] >= m["ttft_ms"]["median"] > 0
    for r in data["requests"]:
        assert r["success"] and r["output_tokens"] == 8
        assert 0 < r["ttft"] <= r["e2el"]
        assert r["tpot"] == pytest.approx((r["e2el"] - r["ttft"]) / 7)
        assert len(r["itl"]) <= 7 and all(g >= 0 for g in r["itl"])
        if endpoint == "/v1/completions":
            assert r["prompt_len"] == 24                   # the server's count of the cut prompt
        else:
            assert r["prompt_len"] > 24                    # plus the chat template


def test_bench_serve_reports_failures(bench_server, tiny_llama, tmp_path):
    # wrong API key: every request fails, and the warm-up says why
    with pytest.raises(RuntimeError, match="401"):
        main(["bench", "serve", "--base-url", bench_server.url, "--model", MODEL, "--api-key", "wrong",
              "--num-prompts", "1", "--input-len", "8", "--output-len", "2", "--tokenizer", "none"])
