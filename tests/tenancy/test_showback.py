"""Showback over a real SQLite ledger: exact aggregates per group, windows, filters, rendering and `inferd usage`."""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from inferd.cli.usage import add_usage_parser
from inferd.store import open_store
from inferd.tenancy import ledger
from inferd.tenancy.ledger import LedgerRow
from inferd.tenancy.showback import (GROUP_KEYS, UsageGroup, parse_group_by, parse_time, parse_tz, render_csv,
                                     render_table, usage_report)

DAY = datetime(2026, 11, 22, tzinfo=timezone.utc).timestamp()  # 2026-11-22 00:00 UTC
ALLOWED = "team, model, key, day, deployment, served_model, endpoint, version"


def _row(ts, **kw) -> LedgerRow:
    defaults = dict(endpoint="chat", status=200, key_id="k1", team="a", model="m1",
                    served_model="g1", deployment="d1")
    return LedgerRow(ts=ts, **{**defaults, **kw})


ROWS = [
    # team a, 22 Nov: two successes on m1, one error on m2 just before midnight
    _row(DAY + 3600, prompt_tokens=100, cached_tokens=40, completion_tokens=10, cost_usd=0.01,
         latency_s=0.5, ttft_s=0.1),
    _row(DAY + 7200, prompt_tokens=200, completion_tokens=20, cost_usd=0.02, latency_s=1.5, ttft_s=0.3,
         deployment="d2"),
    _row(DAY + 86400 - 1, status=500, key_id="k2", model="m2", served_model="g2", prompt_tokens=50,
         latency_s=9.0, ttft_s=5.0),
    # team b, exactly at midnight 23 Nov, answered from the cache
    _row(DAY + 86400, team="b", key_id="k3", prompt_tokens=300, cached_tokens=150, completion_tokens=30,
         cost_usd=0.03, latency_s=2.0, ttft_s=0.2, cache_hit=True),
    # an open server: no key, no team; a cancelled completions request
    _row(DAY + 86400 + 60, team=None, key_id=None, model="m2", served_model="g2", endpoint="completions",
         prompt_tokens=10, completion_tokens=5, latency_s=0.25, cancelled=True, stream=True),
]


def _fill(url: str, rows: list[LedgerRow]) -> str:
    store = open_store(url)
    try:
        store.run_sync(lambda tx: ledger.insert(tx, rows))
    finally:
        store.close()
    return url


@pytest.fixture
def url(store_url) -> str:  # SQLite and PostgreSQL
    return _fill(store_url, ROWS)


def report(url: str, **kw) -> list[UsageGroup]:
    store = open_store(url)
    try:
        return store.run_sync(lambda tx: usage_report(tx, **kw))
    finally:
        store.close()


def by_group(groups: list[UsageGroup]) -> dict[tuple, UsageGroup]:
    return {tuple(g.group.values()): g for g in groups}


# ---- parsing ---------------------------------------------------------------------------------------------

def test_parse_group_by():
    assert parse_group_by("team, model") == ["team", "model"]
    assert parse_group_by("day,key,endpoint") == ["day", "key", "endpoint"]
    assert parse_group_by(None) == []
    assert parse_group_by("") == []
    assert GROUP_KEYS == ("team", "model", "key", "day", "deployment", "served_model", "endpoint", "version")


@pytest.mark.parametrize("text", ["team,colour", "tenant", "team,,model"])
def test_parse_group_by_rejects_unknown_keys_naming_the_allowed_ones(text):
    with pytest.raises(ValueError) as e:
        parse_group_by(text)
    assert ALLOWED in str(e.value)


def test_parse_group_by_rejects_repeats():
    with pytest.raises(ValueError, match="repeated"):
        parse_group_by("team,model,team")


def test_parse_time_forms():
    assert parse_time("2026-11-22") == DAY
    assert parse_time("2026-11-22T01:00:00") == DAY + 3600            # naive means UTC
    assert parse_time("2026-11-22T01:00:00Z") == DAY + 3600
    assert parse_time("2026-11-22T02:30:00+01:30") == DAY + 3600
    assert parse_time("1764000000") == 1764000000.0
    assert parse_time(" 12.5 ") == 12.5


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "22/11/2026", "", "nan", "inf"])
def test_parse_time_rejects_garbage(text):
    with pytest.raises(ValueError, match="invalid time"):
        parse_time(text)


# ---- aggregation -----------------------------------------------------------------------------------------

def test_one_total_row_without_group_by(url):
    [g] = report(url)
    assert g.group == {}
    assert (g.requests, g.errors, g.cancelled, g.cache_hits) == (5, 1, 1, 1)
    assert (g.prompt_tokens, g.cached_tokens, g.completion_tokens, g.total_tokens) == (660, 190, 65, 725)
    assert g.cached_share == pytest.approx(190 / 660)
    assert g.cost_usd == pytest.approx(0.06)
    # successes only: 0.25, 0.5, 1.5, 2.0 (the error's 9.0 is left out)
    assert g.latency_p50_s == pytest.approx(1.0)
    assert g.ttft_p50_s == pytest.approx(0.2)                        # 0.1, 0.2, 0.3


def test_group_by_team(url):
    groups = report(url, group_by=["team"])
    assert [g.group for g in groups] == [{"team": "-"}, {"team": "a"}, {"team": "b"}]  # NULL team as "-"
    g = by_group(groups)
    a = g[("a",)]
    assert (a.requests, a.errors, a.cancelled, a.cache_hits) == (3, 1, 0, 0)
    assert (a.prompt_tokens, a.cached_tokens, a.completion_tokens, a.total_tokens) == (350, 40, 30, 380)
    assert a.cached_share == pytest.approx(40 / 350)
    assert a.cost_usd == pytest.approx(0.03)
    # latencies of the two successes: 0.5, 1.5; the 500's 9.0 s does not count
    assert a.latency_p50_s == pytest.approx(1.0)
    assert a.latency_p95_s == pytest.approx(1.45)
    assert a.latency_p99_s == pytest.approx(1.49)
    assert a.ttft_p50_s == pytest.approx(0.2)
    b = g[("b",)]
    assert (b.requests, b.cache_hits, b.prompt_tokens, b.cached_tokens) == (1, 1, 300, 150)
    assert b.cached_share == 0.5
    assert b.latency_p50_s == b.latency_p99_s == 2.0
    anon = g[("-",)]
    assert (anon.requests, anon.cancelled, anon.prompt_tokens, anon.completion_tokens) == (1, 1, 10, 5)
    assert anon.cached_share == 0.0
    assert anon.ttft_p50_s is None                                   # no TTFT recorded


def test_group_by_team_and_model(url):
    groups = report(url, group_by=["team", "model"])
    assert [tuple(g.group.values()) for g in groups] == [("-", "m2"), ("a", "m1"), ("a", "m2"), ("b", "m1")]
    g = by_group(groups)
    assert (g[("a", "m1")].requests, g[("a", "m1")].prompt_tokens, g[("a", "m1")].errors) == (2, 300, 0)
    only_error = g[("a", "m2")]
    assert (only_error.requests, only_error.errors, only_error.prompt_tokens) == (1, 1, 50)
    # a group whose only request failed has no latency percentiles at all
    assert only_error.latency_p50_s is None and only_error.latency_p99_s is None
    assert only_error.ttft_p50_s is None


def test_group_by_day_splits_at_utc_midnight(url):
    groups = report(url, group_by=["day"])
    assert [(g.group["day"], g.requests, g.prompt_tokens) for g in groups] == [
        ("2026-11-22", 3, 350), ("2026-11-23", 2, 310)]


@pytest.mark.parametrize("zone, days", [("Asia/Tokyo", [("2026-11-22", 2), ("2026-11-23", 3)]),
                                         ("America/Los_Angeles", [("2026-11-21", 2), ("2026-11-22", 3)])])
def test_group_by_day_in_a_time_zone_splits_at_its_midnight(url, zone, days):
    assert [(g.group["day"], g.requests) for g in report(url, group_by=["day"], tz=parse_tz(zone))] == days


def test_parse_tz():
    assert parse_tz(None) is timezone.utc and parse_tz("") is timezone.utc
    assert str(parse_tz("Europe/Paris")) == "Europe/Paris"
    with pytest.raises(ValueError, match="unknown time zone 'Nowhere/Else': use an IANA name"):
        parse_tz("Nowhere/Else")
    for bad in ("../../etc/passwd", "/etc/localtime", "America", "x" * 5000, "a\x00b"):
        with pytest.raises(ValueError, match="unknown time zone"):
            parse_tz(bad)


@pytest.fixture
def far_timezone(monkeypatch):
    """The machine's clock at UTC+14 (a POSIX TZ string, no tz database needed)."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is Unix-only")
    monkeypatch.setenv("TZ", "XYZ-14")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_days_and_naive_times_are_utc_whatever_the_local_zone(url, far_timezone):
    assert time.localtime(DAY).tm_hour == 14                         # the zone really changed
    assert parse_time("2026-11-22") == DAY
    assert parse_time("2026-11-22T01:00:00") == DAY + 3600
    assert [(g.group["day"], g.requests) for g in report(url, group_by=["day"])] == [
        ("2026-11-22", 3), ("2026-11-23", 2)]


def test_group_by_key_deployment_served_model_endpoint(url):
    keys = report(url, group_by=["key"])
    assert [(g.group["key"], g.requests) for g in keys] == [("-", 1), ("k1", 2), ("k2", 1), ("k3", 1)]
    deps = report(url, group_by=["deployment", "served_model"])
    assert [(g.group["deployment"], g.group["served_model"], g.requests) for g in deps] == [
        ("d1", "g1", 2), ("d1", "g2", 2), ("d2", "g1", 1)]
    eps = report(url, group_by=["endpoint"])
    assert [(g.group["endpoint"], g.requests) for g in eps] == [("chat", 4), ("completions", 1)]


def test_window_start_inclusive_end_exclusive(url):
    [g] = report(url, start=DAY + 7200, end=DAY + 86400)
    assert (g.requests, g.prompt_tokens) == (2, 250)                 # the 02:00 row and the 23:59:59 error
    [g] = report(url, start=DAY + 86400)
    assert (g.requests, g.prompt_tokens) == (2, 310)                 # the midnight row is in
    [g] = report(url, end=DAY + 3600)
    assert g.requests == 0                                           # the 01:00 row is out


def test_empty_window(url):
    [g] = report(url, start=DAY + 10 * 86400)
    assert (g.requests, g.cost_usd, g.cached_share, g.latency_p50_s) == (0, 0.0, 0.0, None)
    assert report(url, start=DAY + 10 * 86400, group_by=["team"]) == []


def test_team_and_key_filters(url):
    assert [g.group for g in report(url, team="a", group_by=["team"])] == [{"team": "a"}]
    [g] = report(url, team="a")
    assert (g.requests, g.errors, g.prompt_tokens) == (3, 1, 350)
    [g] = report(url, key_id="k1")
    assert (g.requests, g.prompt_tokens, g.completion_tokens) == (2, 300, 30)
    [g] = report(url, team="a", key_id="k3")                         # k3 is team b's
    assert g.requests == 0
    [g] = report(url, team="a", start=DAY + 7200)
    assert g.requests == 2


def test_filters_go_to_sql_as_parameters_and_only_needed_columns_are_read(url):
    seen: list[tuple[str, tuple]] = []

    def spy(tx):
        fetchall = tx.fetchall

        def recording(sql, params=()):
            seen.append((sql, tuple(params)))
            return fetchall(sql, params)
        tx.fetchall = recording
        return usage_report(tx, start=1.0, end=2e9, team="a' OR '1'='1", key_id="k1", group_by=["team"])

    store = open_store(url)
    try:
        assert store.run_sync(spy) == []                             # the injection attempt matched nothing
    finally:
        store.close()
    [(sql, params)] = seen
    assert params == (1.0, 2e9, "a' OR '1'='1", "k1")
    assert "OR '1'" not in sql and "k1" not in sql and "*" not in sql
    assert "request_id" not in sql and "batch_id" not in sql


def test_unknown_group_key_in_report(url):
    with pytest.raises(ValueError) as e:
        report(url, group_by=["colour"])
    assert ALLOWED in str(e.value)


def test_percentiles_match_numpy(tmp_path):
    rng = random.Random(7)
    rows = [_row(DAY + i, latency_s=rng.uniform(0.01, 3.0), ttft_s=rng.uniform(0.001, 0.5)) for i in range(97)]
    # failures are slow and must not drag the percentiles; one success has no latency at all
    rows += [_row(DAY + 200 + i, status=rng.choice([400, 429, 500, 503]), latency_s=50.0 + i, ttft_s=40.0)
             for i in range(11)]
    rows.append(_row(DAY + 300, latency_s=None, ttft_s=None))
    url = _fill(f"sqlite:///{tmp_path}/p.db", rows)
    [g] = report(url)
    ok = [r.latency_s for r in rows if r.status < 400 and r.latency_s is not None]
    ttfts = [r.ttft_s for r in rows if r.status < 400 and r.ttft_s is not None]
    assert (g.requests, g.errors, len(ok)) == (109, 11, 97)
    assert g.latency_p50_s == pytest.approx(float(np.percentile(ok, 50)), rel=1e-12)
    assert g.latency_p95_s == pytest.approx(float(np.percentile(ok, 95)), rel=1e-12)
    assert g.latency_p99_s == pytest.approx(float(np.percentile(ok, 99)), rel=1e-12)
    assert g.ttft_p50_s == pytest.approx(float(np.percentile(ttfts, 50)), rel=1e-12)
    assert g.ttft_p95_s == pytest.approx(float(np.percentile(ttfts, 95)), rel=1e-12)
    assert g.ttft_p99_s == pytest.approx(float(np.percentile(ttfts, 99)), rel=1e-12)
    assert g.latency_p99_s < 3.0


# ---- rendering -------------------------------------------------------------------------------------------

def test_to_dict_flattens_the_group(url):
    a = by_group(report(url, group_by=["team", "model"]))[("a", "m1")]
    d = a.to_dict()
    assert list(d)[:3] == ["team", "model", "requests"]
    assert "group" not in d
    assert (d["team"], d["model"], d["requests"], d["prompt_tokens"], d["total_tokens"]) == ("a", "m1", 2, 300, 330)
    assert d["latency_p50_s"] == pytest.approx(1.0)
    assert json.loads(json.dumps(d)) == d


def test_render_table_with_totals(url):
    text = render_table(report(url, group_by=["team"]), ["team"])
    lines = text.splitlines()
    assert lines[0].split() == ["team", "requests", "errors", "prompt", "cached", "%", "completion",
                                "cost", "USD", "p50", "ms", "p95", "ms", "p99", "ms"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["a"] == ["a", "3", "1", "350", "11.4%", "30", "0.0300", "1000.0", "1450.0", "1490.0"]
    assert rows["-"] == ["-", "1", "0", "10", "0.0%", "5", "0.0000", "250.0", "250.0", "250.0"]
    assert rows["TOTAL"] == ["TOTAL", "5", "1", "660", "28.8%", "65", "0.0600", "-", "-", "-"]
    assert lines[-1].startswith("TOTAL")
    assert len({len(line) for line in lines}) == 1                   # aligned: every line equally wide


def test_render_table_single_group_has_no_total(url):
    lines = render_table(report(url), []).splitlines()
    assert len(lines) == 3
    assert lines[2].split() == ["5", "1", "660", "28.8%", "65", "0.0600", "1000.0", "1925.0", "1985.0"]
    assert "TOTAL" not in render_table(report(url, group_by=["team"], team="b"), ["team"])


def test_render_csv_round_trips(url):
    groups = report(url, group_by=["team", "model"])
    text = render_csv(groups, ["team", "model"])
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames[:3] == ["team", "model", "requests"]
    assert set(reader.fieldnames) == set(groups[0].to_dict())
    rows = {(r["team"], r["model"]): r for r in reader}
    assert list(rows) == [("-", "m2"), ("a", "m1"), ("a", "m2"), ("b", "m1")]
    a = rows[("a", "m1")]
    assert (int(a["requests"]), int(a["prompt_tokens"]), int(a["cached_tokens"])) == (2, 300, 40)
    assert float(a["cost_usd"]) == pytest.approx(0.03)
    assert float(a["cached_share"]) == pytest.approx(40 / 300)
    assert float(a["latency_p95_s"]) == pytest.approx(1.45)
    assert rows[("a", "m2")]["latency_p50_s"] == ""                  # no value, empty cell
    assert int(rows[("b", "m1")]["cache_hits"]) == 1


# ---- the command -----------------------------------------------------------------------------------------

def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="inferd")
    add_usage_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_days_in_a_time_zone(url, capsys):
    assert run_cli(["usage", "--store", url, "--group-by", "day", "--tz", "Asia/Tokyo", "--format", "json"]) == 0
    assert [(d["day"], d["requests"]) for d in json.loads(capsys.readouterr().out)] == [
        ("2026-11-22", 2), ("2026-11-23", 3)]


def test_cli_json(url, capsys):
    assert run_cli(["usage", "--store", url, "--group-by", "team,model", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(d["team"], d["model"], d["requests"]) for d in out] == [
        ("-", "m2", 1), ("a", "m1", 2), ("a", "m2", 1), ("b", "m1", 1)]
    assert out[1]["latency_p50_s"] == pytest.approx(1.0)


def test_cli_window_and_team_csv(url, capsys):
    assert run_cli(["usage", "--store", url, "--start", "2026-11-22T02:00:00", "--end", "2026-11-23",
                    "--team", "a", "--group-by", "day", "--format", "csv"]) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["day"], row["requests"], row["errors"], row["prompt_tokens"]) == ("2026-11-22", "2", "1", "250")


def test_cli_key_filter_table(url, capsys):
    assert run_cli(["usage", "--store", url, "--key", "k1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["2", "0", "300", "13.3%", "30", "0.0300", "1000.0", "1450.0", "1490.0"]


def test_cli_default_store_url(url, monkeypatch, capsys):
    monkeypatch.setenv("INFERD_STORE", url)
    assert run_cli(["usage", "--format", "json"]) == 0
    [total] = json.loads(capsys.readouterr().out)
    assert (total["requests"], total["total_tokens"]) == (5, 725)


@pytest.mark.parametrize("argv, message", [
    (["--group-by", "team,colour"], ALLOWED),
    (["--start", "last tuesday"], "invalid time"),
    (["--start", "2026-11-23", "--end", "2026-11-22"], "must be before"),
    (["--tz", "Moon/Base"], "unknown time zone"),
])
def test_cli_bad_input_raises_before_opening_the_store(tmp_path, argv, message):
    path = tmp_path / "never.db"
    with pytest.raises(ValueError) as e:
        run_cli(["usage", "--store", f"sqlite:///{path}", *argv])
    assert message in str(e.value)
    assert not path.exists()


def test_group_by_version_sums_each_model_version(store_url):
    rows = [_row(DAY + 1, model_version="v1", cost_usd=0.01), _row(DAY + 2, model_version="v2", cost_usd=0.02),
            _row(DAY + 3, model_version="v2", status=500), _row(DAY + 4)]
    g = by_group(report(_fill(store_url, rows), group_by=["served_model", "version"]))
    assert {k: (v.requests, v.errors) for k, v in g.items()} == {
        ("g1", "v1"): (1, 0), ("g1", "v2"): (2, 1), ("g1", "-"): (1, 0)}
    assert g[("g1", "v2")].cost_usd == pytest.approx(0.02)
