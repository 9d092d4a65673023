"""Fixtures for the web app's tests: a real `inferd serve` and the system's Chromium driven by Playwright.

The server serves four chat groups: `tiny-a` and `tiny-b` (the tiny random Llama
twice, each its own engine core), `remote` (a mock OpenAI-compatible provider in
this process, streaming one word every 20 ms so that its answers take a visible
while), each with its own price, and `flaky`, a provider that is down, falling back
to `tiny-b`; behind an admin key. The browser is Debian's
`chromium` (scripts/install.sh installs it), never a downloaded one; without it, or
without Playwright, these tests skip, unless INFERD_REQUIRE_BROWSER is set (CI sets
it) and then they fail. With INFERD_SCREENSHOTS=DIR the tests that take the
screenshots in docs/ui.md write them there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.api.conftest import ServerProc, free_port
from tests.gateway.mock_upstream import MockUpstream

ADMIN = "ui-admin-key"
CHROMIUM = "/usr/bin/chromium"
PRICES = {"tiny-a": {"input": 1.0, "output": 2.0}, "tiny-b": {"input": 3.0, "output": 6.0},
          "remote": {"input": 150.0, "output": 600.0}}


def _missing(reason: str):
    if os.environ.get("INFERD_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (INFERD_REQUIRE_BROWSER is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mock_remote():
    mock = MockUpstream(model="mock-remote", chunk_interval=0.02).start()
    yield mock
    mock.stop()


@pytest.fixture(scope="session")
def ui_server(tiny_llama, mock_remote, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")

    def local(name):
        return {"name": name, "price": PRICES[name],
                "deployments": [{"provider": "local", "name": f"{name}-local", "model": str(tiny_llama)}]}

    config = {"models": [local("tiny-a"), local("tiny-b"),
                         {"name": "remote", "price": PRICES["remote"],
                          "deployments": [{"provider": "openai", "name": "remote-mock", "model": "mock-remote",
                                           "base_url": mock_remote.openai_base_url}]},
                         # a provider nobody listens for: every request falls back to tiny-b
                         {"name": "flaky", "retry": {"max_retries": 0}, "fallbacks": {"default": ["tiny-b"]},
                          "deployments": [{"provider": "openai", "name": "flaky-down", "model": "m",
                                           "base_url": f"http://127.0.0.1:{free_port()}/v1"}]}]}
    (tmp / "inferd.yaml").write_text(yaml.safe_dump(config))
    db = tmp / "ledger.db"
    srv = ServerProc(tiny_llama, "--config", str(tmp / "inferd.yaml"), "--store", f"sqlite:///{db}",
                     api_key=ADMIN)
    try:
        srv.wait_ready(timeout=240)  # two engine cores start side by side, on a CPU that may be busy
    except BaseException:
        srv.stop()
        raise
    srv.db = db
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def open_server(tiny_llama, mock_remote, tmp_path_factory):
    """A server with no key at all, serving the mock under two names: it starts in a second."""
    def remote(name):
        return {"name": name, "deployments": [{"provider": "openai", "name": f"{name}-mock", "model": "mock-remote",
                                               "base_url": mock_remote.openai_base_url}]}
    path = tmp_path_factory.mktemp("ui-open") / "inferd.yaml"
    path.write_text(yaml.safe_dump({"models": [remote("left"), remote("right")]}))
    srv = ServerProc(tiny_llama, "--config", str(path), api_key=None).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed")
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as p:
        # as root (CI) Chromium's sandbox cannot start; containers often have a /dev/shm too small for it
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(chromium, request):
    """`open_page(key=..., path=..., server=..., **context options)`: a fresh tab (its own sessionStorage) on
    the app, the key given to its prompt (None: no prompt expected); the server is `ui_server` by default."""
    contexts, errors = [], []

    def make(key: str | None = ADMIN, path: str = "/", server=None, **options):
        context = chromium.new_context(**{"viewport": {"width": 1280, "height": 900}, **options})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))  # an uncaught exception in the app's script
        page.set_default_timeout(20_000)
        page.goto((server or request.getfixturevalue("ui_server")).url + path)
        if key is not None:
            enter_key(page, key)
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, errors


def enter_key(page, key: str) -> None:
    """Answer the key prompt the first 401 opens."""
    page.locator("#key-dialog[open]").wait_for()
    page.fill("#key-input", key)
    page.press("#key-input", "Enter")  # the keyboard is enough: Enter submits with the first button, "Use key"
    page.locator("#key-dialog[open]").wait_for(state="detached")


def screenshot(page, name: str) -> None:
    out = os.environ.get("INFERD_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / name), full_page=True)
