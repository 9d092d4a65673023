"""The usage dashboard in a real browser: its numbers are /v1/usage's and the ledger's, in the reader's zone.

Ledger rows are written straight into the server's store, on days in June 2026
at hours where UTC and the two zones tested (Los Angeles, UTC-7 then; Tokyo,
UTC+9) disagree about the date, so a dashboard that got the zone wrong would
put rows on the wrong day. For each zone the tab runs in that zone, asks for
two local days and checks its totals against /v1/usage for the same instants
and against a plain SQL sum over the ledger, and each day row against the SQL
count of that local day. A team key sees its own team only.
"""

from __future__ import annotations

import io
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import httpx
import openai
import pytest

from inferd.store import open_store
from inferd.tenancy import ledger
from inferd.tenancy.ledger import LedgerRow
from tests.web.conftest import ADMIN, screenshot

UTC_HOURS = [(10, 20), (11, 3), (11, 8), (11, 14), (11, 19), (12, 1), (12, 6), (12, 16), (12, 23), (13, 4)]


@pytest.fixture(scope="module")
def seeded(ui_server):
    """Ten June rows for teams red and blue, with a key each; returns {team: key}."""
    keys = {}
    for team in ("red", "blue"):
        r = httpx.post(ui_server.url + "/admin/keys", json={"team": team}, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        keys[team] = r.json()
    rows = []
    for i, (day, hour) in enumerate(UTC_HOURS):
        team = ("red", "blue")[i % 2]
        rows.append(LedgerRow(
            ts=datetime(2026, 6, day, hour, 30, tzinfo=timezone.utc).timestamp(), endpoint="chat",
            status=500 if i == 3 else 200, key_id=keys[team]["id"], team=team,
            model=("tiny-a", "remote", "tiny-b")[i % 3], served_model=("tiny-a", "remote", "tiny-b")[i % 3],
            deployment="seeded", prompt_tokens=100 + 10 * i, cached_tokens=5 * i, completion_tokens=20 + i,
            cost_usd=0.001 * (i + 1), latency_s=0.1 * (i + 1), ttft_s=0.01 * (i + 1)))
    store = open_store(f"sqlite:///{ui_server.db}")
    try:
        store.run_sync(lambda tx: ledger.insert(tx, rows))
    finally:
        store.close()
    return {team: k["key"] for team, k in keys.items()}


def sql_totals(db, start: float, end: float, team: str | None = None) -> dict:
    where, params = "ts >= ? AND ts < ?", [start, end]
    if team:
        where, params = where + " AND team = ?", params + [team]
    with sqlite3.connect(db) as c:
        n, errors, tokens, cost = c.execute(
            f"SELECT COUNT(*), COALESCE(SUM(status >= 400), 0), COALESCE(SUM(prompt_tokens + completion_tokens), 0), "
            f"COALESCE(SUM(cost_usd), 0) FROM ledger WHERE {where}", params).fetchone()
    return {"requests": n, "errors": errors, "total_tokens": tokens, "cost_usd": cost}


def show(page, start: str, end: str, group_by: str, zone: str) -> tuple[float, float]:
    """Ask the dashboard for [start, end) local time; wait until it shows that range; the range in Unix seconds."""
    page.locator("#totals[data-start]").wait_for()  # the first load is done: it cannot overwrite ours
    page.fill("#range-start", start)
    page.fill("#range-end", end)
    page.select_option("#group-by", group_by)
    page.click("#refresh")
    t0 = datetime.fromisoformat(start).replace(tzinfo=ZoneInfo(zone)).timestamp()
    t1 = datetime.fromisoformat(end).replace(tzinfo=ZoneInfo(zone)).timestamp()
    page.wait_for_function("([s, e, g]) => { const t = document.getElementById('totals').dataset;"
                           " return t.start === s && t.end === e && t.groupBy === g; }",
                           arg=[js_number(t0), js_number(t1), group_by])
    return t0, t1


def js_number(x: float) -> str:
    """What JavaScript's String(x) writes for a Unix time: no ".0" on whole seconds."""
    return str(int(x)) if x.is_integer() else repr(x)


def shown_totals(page) -> dict:
    cells = page.locator("[data-total]")
    return {cells.nth(i).get_attribute("data-total"): float(cells.nth(i).get_attribute("data-value"))
            for i in range(cells.count())}


def shown_rows(page) -> dict[str, dict]:
    out = {}
    for tr in page.locator("#usage-table tbody tr").all():
        label = tr.locator("th").inner_text()
        out[label] = {td.get_attribute("data-key"): float(td.get_attribute("data-value"))
                      for td in tr.locator("td").all()}
    return out


def api_usage(srv, key: str, **params) -> list[dict]:
    r = httpx.get(srv.url + "/v1/usage", params=params, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def assert_same(shown: dict, api: dict, sql: dict) -> None:
    for name in ("requests", "errors", "total_tokens"):
        assert shown[name] == api[name] == sql[name], name
    assert shown["cost_usd"] == pytest.approx(api["cost_usd"], rel=1e-12)
    assert api["cost_usd"] == pytest.approx(sql["cost_usd"], rel=1e-9)


@pytest.mark.parametrize("zone", ["America/Los_Angeles", "Asia/Tokyo"])
def test_totals_equal_usage_api_and_ledger_sql_in_the_browsers_time_zone(open_page, ui_server, seeded, zone):
    page = open_page(path="/#dashboard", timezone_id=zone)
    assert page.locator("#tz-name").inner_text() == zone
    t0, t1 = show(page, "2026-06-11T00:00", "2026-06-13T00:00", "day", zone)
    sql = sql_totals(ui_server.db, t0, t1)
    assert 0 < sql["requests"] < len(UTC_HOURS)  # the window cuts the seeded rows somewhere
    assert_same(shown_totals(page), api_usage(ui_server, ADMIN, start=t0, end=t1)[0], sql)
    # one row per local day, each the SQL count between that day's local midnights
    rows = shown_rows(page)
    midnight = datetime(2026, 6, 11, tzinfo=ZoneInfo(zone))
    expected = {}
    for d in range(2):
        a, b = midnight + timedelta(days=d), midnight + timedelta(days=d + 1)
        n = sql_totals(ui_server.db, a.timestamp(), b.timestamp())["requests"]
        if n:
            expected[a.date().isoformat()] = n
    assert {day: r["requests"] for day, r in rows.items()} == expected
    # the charts draw the same groups and numbers
    chart = page.evaluate("(() => { const c = Chart.getChart('chart-cost');"
                          " return {labels: c.data.labels, cost: c.data.datasets[0].data}; })()")
    assert chart["labels"] == list(rows) and chart["cost"] == pytest.approx([r["cost_usd"] for r in rows.values()])
    if zone == "America/Los_Angeles":
        show(page, "2026-06-10T00:00", "2026-06-14T00:00", "model", zone)
        page.wait_for_timeout(300)  # the charts draw on the next frames
        screenshot(page, "dashboard.png")


def test_a_team_key_sees_its_own_team_only(open_page, ui_server, seeded):
    page = open_page(key=seeded["red"], path="/#dashboard", timezone_id="UTC")
    t0, t1 = show(page, "2026-06-01T00:00", "2026-07-01T00:00", "team", "UTC")
    assert list(shown_rows(page)) == ["red"]
    assert "blue" not in page.locator("#usage-table").inner_text()
    sql = sql_totals(ui_server.db, t0, t1, team="red")
    assert sql["requests"] == len(UTC_HOURS) // 2
    assert_same(shown_totals(page), api_usage(ui_server, seeded["red"], start=t0, end=t1)[0], sql)
    # the admin, in the same range, sees both teams
    assert {g["team"] for g in api_usage(ui_server, ADMIN, start=t0, end=t1, group_by="team")} == {"red", "blue"}


def test_live_engines_and_batch_progress(open_page, ui_server, seeded):
    client = openai.OpenAI(base_url=ui_server.url + "/v1", api_key=seeded["blue"], max_retries=0)
    line = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-a", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}}
    lines = "".join(json.dumps({**line, "custom_id": f"r{i}"}) + "\n" for i in range(3)).encode()
    f = client.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    page = open_page(key=seeded["blue"], path="/#dashboard")
    live = page.locator("#live-table tbody tr")
    live.first.wait_for()
    assert sorted(tr.get_attribute("data-deployment") for tr in live.all()) == \
        ["flaky-down", "remote-mock", "tiny-a-local", "tiny-b-local"]
    # a request that finishes between two refreshes shows as the engine's tokens/s
    r = httpx.post(ui_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {seeded['blue']}"},
                   json={"model": "tiny-b", "max_tokens": 64, "ignore_eos": True,
                         "messages": [{"role": "user", "content": "count"}]})
    assert r.status_code == 200
    page.wait_for_function("(() => { const td = document.querySelector("
                           "'#live-table tr[data-deployment=\"tiny-b-local\"] td[data-key=tps]');"
                           " return td && Number(td.textContent) > 0; })()", polling=50)
    row = page.locator("#batch-table tbody tr", has_text=batch.id)
    row.filter(has_text="completed").wait_for(timeout=60_000)  # the table refreshes itself
    assert "3/3" in row.inner_text()
    progress = row.locator("progress")
    assert progress.get_attribute("value") == "3" and progress.get_attribute("max") == "3"
