"""Tensor models beside an LLM in one `inferd serve`: both answer, on their own protocols."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import yaml

from tests.api.conftest import ServerProc


@pytest.fixture(scope="module")
def mixed(tiny_llama, model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    config = {"models": [
        {"name": "chat", "deployments": [{"provider": "local", "model": str(tiny_llama)}]},
        {"name": "rec", "deployments": [{"provider": "onnx", "model": str(model_dir / "rec.onnx"),
                                         "max_queue_delay_microseconds": 500}]}]}
    (tmp / "inferd.yaml").write_text(yaml.safe_dump(config))
    server = ServerProc(tiny_llama, "--config", str(tmp / "inferd.yaml"), api_key=None).wait_ready()
    yield server
    server.stop()


def test_llm_and_tensor_model_in_one_server(mixed, model_dir):
    users, items = np.load(model_dir / "users.npy"), np.load(model_dir / "items.npy")
    r = httpx.post(mixed.url + "/v2/models/rec/infer", json={
        "inputs": [{"name": "user_id", "shape": [2], "datatype": "INT64", "data": [4, 9]}],
        "outputs": [{"name": "items"}]})
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    expected = np.argsort(-(users[[4, 9]] @ items.T), axis=1, kind="stable")[:, :5]
    assert out["shape"] == [2, 5] and np.array(out["data"]).reshape(2, 5).tolist() == expected.tolist()
    chat = httpx.post(mixed.url + "/v1/chat/completions", json={
        "model": "chat", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
    assert {m["id"] for m in httpx.get(mixed.url + "/v1/models").json()["data"]} == {"chat", "rec"}
    assert httpx.get(mixed.url + "/v2/models/chat").status_code == 400  # not a tensor model
    assert httpx.get(mixed.url + "/v2/health/ready").status_code == 200
