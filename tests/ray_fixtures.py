"""A real local Ray cluster for the scale-out tests, and `inferd serve` in front of it.

`RayCluster` runs `ray start --head --block` on loopback with two CPUs, no
dashboard and a 200 MB object store, in a temporary directory of its own (never
the machine's default /tmp/ray, which another cluster may use), and stops it by
ending that command's process group: `ray stop` would stop every cluster of the
user on the machine. Its workers import this checkout's `inferd` (PYTHONPATH),
as the server does. It uses Ray's token authentication with a token of its own,
given to the cluster, `ray status` and the server in the environment: with none
set, Ray would use (or write) ~/.ray/auth_token, which belongs to the user.

Without Ray installed the tests that need it are skipped, unless
INFERD_REQUIRE_RAY is set (CI sets it): then they fail, so a broken install
cannot pass as a green run that never placed an engine on Ray.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.api.conftest import ROOT, ServerProc, free_port


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        reason = "Ray is not installed (pip install 'inferd[ray]')"
        if os.environ.get("INFERD_REQUIRE_RAY"):
            pytest.fail(f"{reason} (INFERD_REQUIRE_RAY is set)", pytrace=False)
        pytest.skip(reason)


class RayCluster:
    def __init__(self, num_cpus: int = 2):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # short: Ray's unix socket paths live under it and must stay under ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        ray = Path(sys.executable).parent / "ray"
        cmd = [str(ray) if ray.exists() else "ray", "start", "--head", "--block", "--port", str(self.port),
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
               "--include-dashboard", "false", "--object-store-memory", str(200 * 2**20),
               "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
        self.log = open(Path(self.temp_dir) / "start.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> RayCluster:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.output()}")
            status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", self.address],
                                    capture_output=True, text=True, timeout=30, env={**os.environ, **self.env})
            if status.returncode == 0 and "CPU" in status.stdout:
                return self
            time.sleep(0.5)
        raise TimeoutError(f"the Ray cluster did not come up:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (Path(self.temp_dir) / "start.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # whatever of the cluster is left (it runs in the session `ray start` led)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    require_ray()
    cluster = RayCluster()
    try:
        cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


def ray_deployment(cluster: RayCluster, model: Path, **extra) -> dict:
    """A `provider: ray` deployment of `model` on `cluster`: replicas of one CPU, a tiny KV cache."""
    return {"provider": "ray", "name": "tiny-ray", "model": str(model), "address": cluster.address,
            "link_host": "127.0.0.1", "num_cpus": 1, "replicas": 2,
            "engine": {"dtype": "float32", "kv_cache_bytes": "16MiB", "max_num_seqs": 8}, **extra}


def serve_on_ray(cluster: RayCluster, model: Path, tmp: Path, *extra_args: str, routing: str = "least_in_flight",
                 **deployment) -> ServerProc:
    """`inferd serve --config` with one group, `tiny`, served by replicas on the cluster."""
    config = {"models": [{"name": "tiny", "routing": routing,
                          "deployments": [ray_deployment(cluster, model, **deployment)]}]}
    path = tmp / "inferd.yaml"
    path.write_text(yaml.safe_dump(config))
    srv = ServerProc(model, "--config", str(path), *extra_args, env=cluster.env)
    try:
        return srv.wait_ready(timeout=120)
    except BaseException:
        srv.stop()
        raise
