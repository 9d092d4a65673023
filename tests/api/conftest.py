"""Fixtures: real `inferd serve` processes on loopback, running tiny random Llamas.

`server` is the shared one (the CLI exactly as a user runs it, with an API key);
`start_server` launches others with extra flags (a small waiting queue, a short
shutdown timeout).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.tiny_models import build_tiny_model

API_KEY = "test-key"
MODEL = "tiny"
ROOT = Path(__file__).resolve().parents[2]

def wait_for(predicate, timeout: float = 10.0):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, model: Path, *extra: str, api_key: str | None = API_KEY, log_level: str = "warning",
                 env: dict[str, str] | None = None):
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        argv = ["--log-level", log_level, "serve", str(model), "--port", str(self.port),
                "--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-bytes", "16MiB",
                "--num-threads", "1", *extra]
        if api_key:
            argv += ["--api-key", api_key]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="inferd-server-", suffix=".log", delete=False)
        self.store_path = f"{self.log.name}.db"
        if "--store" not in extra:  # each server its own ledger, never the user's
            argv += ["--store", f"sqlite:///{self.store_path}"]
        cmd = [sys.executable, "-m", "inferd.cli", *argv]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> "ServerProc":
        # generous: a loaded 2-core machine that compiles the CPU kernels on first use took over 90 s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server did not become healthy:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                                  max_retries=0, **kw)

    def core_pid(self) -> int:
        """The engine core: the spawned child of the server process."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"spawn_main" in cmdline:
                return int(entry.name)
        raise LookupError("no engine core process found")

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: metric name -> value (last sample wins)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name_labels, value = line.rsplit(" ", 1)
                name = name_labels.split("{", 1)[0]
                if 'finished_reason="' in name_labels:
                    name += "{" + name_labels.split('finished_reason="', 1)[1].split('"', 1)[0] + "}"
                values[name] = float(value)
        return values

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(tiny_llama):
    srv = ServerProc(tiny_llama).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def embedded():
    """`inferd serve` on the embedded SmolLM2-135M-Instruct: for what needs a model that follows instructions."""
    from inferd.models.default_model import default_model_path

    srv = ServerProc(default_model_path(), "--max-model-len", "2048", "--kv-cache-bytes", "256MiB").wait_ready(timeout=180)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_llama_long(tmp_path_factory):
    """The tiny Llama with a 4096-token context: long generations take seconds, not ms."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-long"), "llama", max_position_embeddings=4096)


# servers of tiny_llama_slow need more than the default 16 MiB of KV cache for its 4096 tokens
SLOW_KV = ("--kv-cache-bytes", "256MiB")


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    from inferd.engine.tokenizer import Tokenizer
    from inferd.models.loader import load_checkpoint

    return Tokenizer(load_checkpoint(tiny_llama, progress=False).tokenizer)
