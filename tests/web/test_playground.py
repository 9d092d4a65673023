"""The playground in a real browser: two panes stream at once, a stop stops, an error stays in its pane.

Each test opens its own tab on the shared server (tests/web/conftest.py). The
numbers a pane shows are checked against what the server metered for the same
request: the ledger row's tokens and cost.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time

import pytest

from tests.api.conftest import wait_for
from tests.gateway.mock_upstream import Fault
from tests.web.conftest import PRICES, screenshot

def pane(page, i: int):
    return page.locator(".pane").nth(i)


def metric(p, name: str) -> str:
    return p.locator(f'[data-m="{name}"]').inner_text()


def choose(page, models: list[str]) -> None:
    page.locator(".pane").first.wait_for()
    while page.locator(".pane").count() < len(models):
        page.click("#add-pane")
    for i, model in enumerate(models):
        pane(page, i).locator("select.model").select_option(model)


def wait_status(p, *statuses: str, timeout: float = 20_000) -> str:
    p.locator(".status").filter(has_text=re.compile("^(" + "|".join(statuses) + ")$")).wait_for(timeout=timeout)
    return p.locator(".status").inner_text()


def ledger_rows(srv, model: str) -> list[sqlite3.Row]:
    with sqlite3.connect(srv.db) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM ledger WHERE served_model = ? ORDER BY ts", (model,)).fetchall()


def test_two_panes_stream_at_once_and_show_their_metrics(open_page, ui_server):
    page = open_page()
    choose(page, ["tiny-a", "remote"])
    before = {m: len(ledger_rows(ui_server, m)) for m in ("tiny-a", "remote")}
    page.fill("#max-tokens", "16")
    page.fill("#temperature", "0")
    page.fill("#system", "Answer briefly.")
    page.fill("#user", "Name three colors.")
    page.click("#send")
    for i, (model, deployment) in enumerate([("tiny-a", "tiny-a-local"), ("remote", "remote-mock")]):
        p = pane(page, i)
        assert wait_status(p, "done", "failed") == "done", p.locator(".pane-error").inner_text()
        assert p.locator(".log li.user").inner_text().endswith("Name three colors.")
        assert p.locator(".log li.assistant .text").inner_text().strip()
        assert re.fullmatch(r"\d+ ms", metric(p, "ttft"))
        assert float(metric(p, "tps")) > 0
        assert metric(p, "deployment") == deployment
        row = wait_for(lambda m=model: len(ledger_rows(ui_server, m)) > before[m] and ledger_rows(ui_server, m)[-1])
        assert int(metric(p, "prompt")) == row["prompt_tokens"]
        assert int(metric(p, "completion")) == row["completion_tokens"] == 16
        assert int(metric(p, "cached")) == row["cached_tokens"]
        cost = (row["prompt_tokens"] * PRICES[model]["input"] + 16 * PRICES[model]["output"]) / 1e6
        assert row["cost_usd"] == pytest.approx(cost)
        assert float(metric(p, "cost").lstrip("$")) == pytest.approx(cost, rel=5e-3)  # shown to 3 digits
    # both were under way at the same moment: each started before the other finished
    started = [float(pane(page, i).get_attribute("data-started")) for i in range(2)]
    finished = [float(pane(page, i).get_attribute("data-finished")) for i in range(2)]
    assert max(started) < min(finished)
    screenshot(page, "playground.png")


def test_a_fallback_shows_which_deployment_answered(open_page):
    page = open_page()
    choose(page, ["flaky", "tiny-a"])
    page.fill("#max-tokens", "4")
    page.fill("#user", "Hello")
    page.click("#send")
    p = pane(page, 0)
    assert wait_status(p, "done", "failed") == "done", p.locator(".pane-error").inner_text()
    assert metric(p, "deployment") == "tiny-b-local (fell back from flaky)"
    assert p.locator(".log li.assistant .who").inner_text() == "tiny-b"  # the group that answered


def test_a_stopped_stream_stops(open_page, ui_server, mock_remote):
    page = open_page()
    choose(page, ["remote", "tiny-b"])
    mock_remote.inject(Fault.stall(after=3))  # three words, then the upstream holds the stream open
    page.fill("#user", "Tell me a long story.")
    page.click("#send")
    p = pane(page, 0)
    p.locator(".log li.assistant .text").filter(has_text=re.compile(r"\w")).wait_for()
    wait_status(pane(page, 1), "done")
    p.locator("button.stop").click()
    assert wait_status(p, "stopped") == "stopped"
    text = p.locator(".log li.assistant .text").inner_text()
    time.sleep(0.3)
    assert p.locator(".log li.assistant .text").inner_text() == text
    assert p.locator("button.stop").is_disabled() and p.locator(".pane-error").inner_text() == ""
    # the server saw the client go: the request is metered as cancelled
    wait_for(lambda: any(r["cancelled"] and r["stream"] for r in ledger_rows(ui_server, "remote")))


def test_an_error_shows_in_the_pane_that_caused_it(open_page, mock_remote):
    page = open_page()
    choose(page, ["tiny-a", "remote"])
    mock_remote.inject(Fault.error(400, "the mock refuses this prompt"))
    page.fill("#user", "Say something.")
    page.click("#send")
    bad, good = pane(page, 1), pane(page, 0)
    assert wait_status(bad, "done", "failed") == "failed"
    assert "the mock refuses this prompt" in bad.locator(".pane-error").inner_text()
    assert bad.locator(".pane-error").get_attribute("role") == "alert"
    assert wait_status(good, "done", "failed") == "done"
    assert good.locator(".pane-error").inner_text() == ""


def test_rerun_on_another_model_and_copy_the_request(open_page):
    page = open_page()
    choose(page, ["tiny-a", "tiny-b"])
    page.fill("#max-tokens", "8")
    page.fill("#seed", "7")
    page.fill("#user", "Hello")
    page.keyboard.press("Control+Enter")  # keyboard only: the textarea sends with Ctrl+Enter
    p = pane(page, 1)
    wait_status(p, "done")
    p.locator("select.model").select_option("remote")
    p.locator("button.rerun").click()
    assert wait_status(p, "done", "failed") == "done"
    assert metric(p, "deployment") == "remote-mock"
    assert p.locator(".log li.user").count() == 1 and p.locator(".log li.assistant").count() == 1
    assert "alpha" in p.locator(".log li.assistant .text").inner_text()  # the mock's words
    p.locator("button.copy-python").click()
    code = page.locator("#code-text").inner_text()
    compile(code, "request.py", "exec")  # valid Python
    assert 'model="remote"' in code and "seed=7" in code and '"content": "Hello"' in code
    page.click("#code-dialog button[type=submit]")
    p.locator("button.copy-curl").click()
    curl = page.locator("#code-text").inner_text()
    assert "/v1/chat/completions" in curl and '"model": "remote"' in curl and "$INFERD_API_KEY" in curl
    assert "ui-admin-key" not in curl  # a key is never written into a snippet someone may paste
    # the conversation continues per pane: a second turn carries the first, in JSON mode this time
    page.click("#code-dialog button[type=submit]")
    page.check("#json-mode")
    page.fill("#user", "And again")
    page.click("#send")
    assert wait_status(p, "done", "failed") == "done"
    assert wait_status(pane(page, 0), "done", "failed") == "done"  # the local engine enforces the JSON grammar
    assert p.locator(".log li.user").count() == 2 and p.locator(".log li.assistant").count() == 2
    p.locator("button.copy-python").click()
    code = page.locator("#code-text").inner_text()
    compile(code, "request.py", "exec")
    assert '"json_object"' in code and '"content": "And again"' in code and code.count('"role": "user"') == 2


UNNAMED_CONTROLS = """[...document.querySelectorAll('button, select, input, textarea, a[href]')]
    .filter((el) => el.offsetParent !== null && !(el.labels && el.labels.length)
                    && !el.getAttribute('aria-label') && !el.textContent.trim())
    .map((el) => el.outerHTML.slice(0, 80))"""


def test_readable_at_360_px_and_in_dark_mode(open_page):
    page = open_page(viewport={"width": 360, "height": 800}, color_scheme="dark")
    choose(page, ["tiny-a", "remote"])
    assert page.evaluate(UNNAMED_CONTROLS) == []  # every control a keyboard or screen reader reaches has a name
    # Tab from the message reaches the parameters and then the send button, in the page's order
    page.focus("#user")
    order = []
    for _ in range(5):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["temperature", "max-tokens", "seed", "json-mode", "as-chat"]
    for path in ("#playground", "#dashboard"):
        page.evaluate(f"location.hash = '{path}'")
        page.wait_for_timeout(200)
        assert page.evaluate("document.documentElement.scrollWidth") <= 360, path
        assert page.evaluate(UNNAMED_CONTROLS) == [], path
    page.evaluate("location.hash = '#playground'")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert dark == "rgb(18, 19, 22)"
    page.fill("#max-tokens", "12")
    page.fill("#user", "Hello")
    page.click("#send")
    wait_status(pane(page, 1), "done")
    screenshot(page, "playground-360-dark.png")


def test_an_open_server_needs_no_key(open_page, open_server):
    page = open_page(key=None, server=open_server)
    choose(page, ["left", "right"])
    page.fill("#max-tokens", "8")
    page.fill("#user", "Hello")
    page.click("#send")
    for i, deployment in enumerate(["left-mock", "right-mock"]):
        assert wait_status(pane(page, i), "done", "failed") == "done"
        assert metric(pane(page, i), "deployment") == deployment
        assert metric(pane(page, i), "cost") == "$0"  # nobody priced them
    assert page.locator("#key-dialog").get_attribute("open") is None
    assert page.locator("#key-state").inner_text() == "none"
    # a whole chat as the input: every pane gets all of it, and a bad one is refused under the input
    page.click("#clear-all")
    page.check("#as-chat")
    page.fill("#user", '[{"role": "user", "content": "hi"}, {"role": "assistant"}]')
    page.click("#send")
    assert "message 2 needs a role" in page.locator("#prompt-error").inner_text()
    chat = [{"role": "user", "content": "Pick a number."}, {"role": "assistant", "content": "Seven."},
            {"role": "user", "content": "Another one?"}]
    page.fill("#user", json.dumps(chat))
    page.click("#send")
    for i in range(2):
        p = pane(page, i)
        assert wait_status(p, "done", "failed") == "done"
        assert p.locator(".log li").count() == 4
        assert p.locator(".log li.assistant .who").first.inner_text() == "assistant (given)"
    pane(page, 0).locator("button.copy-python").click()
    assert '"content": "Seven."' in page.locator("#code-text").inner_text()
