"""The Open Inference Protocol through a real `inferd serve` with only tensor models and an admin key.

Predictions over HTTP equal the models' own (scikit-learn's predict_proba, numpy for graphs built
with onnx.helper); tritonclient.http talks to the server unchanged; requests that do not fit a
model get a 400 naming the input; a key is required once keys exist; each call is one ledger row
priced per prediction; team rate limits apply; concurrent single rows are batched together.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from inferd.classic.tensors import infer_path_params
from inferd.store import open_store
from inferd.tenancy.ledger import select
from tests.api.conftest import wait_for
from tests.classic.conftest import ADMIN, PRICE_PER_1K, affine_graph

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def auth() -> dict:
    """A fresh copy for tritonclient, which adds its own headers to the dict it is given."""
    return dict(AUTH)


def infer_body(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


def client(srv) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(srv.url.removeprefix("http://"))


def ledger(srv, request_ids: set[str]) -> list:
    store = open_store(srv.store_url)
    try:
        rows = store.run_sync(lambda tx: select(tx, "endpoint = ?", ("infer",)))
    finally:
        store.close()
    return [r for r in rows if r.request_id in request_ids]


def test_predictions_equal_the_sklearn_models_own(srv, fraud_model):
    model, x = fraud_model
    rows = x[:32]
    r = httpx.post(srv.url + "/v2/models/fraud/infer", json=infer_body(rows, id="batch-1"), headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "batch-1" and body["model_name"] == "fraud" and body["model_version"] == "1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["probabilities"]["shape"] == [32, 2] and out["probabilities"]["datatype"] == "FP32"
    probabilities = np.array(out["probabilities"]["data"]).reshape(32, 2)
    np.testing.assert_allclose(probabilities, model.predict_proba(rows), atol=1e-5)
    assert out["label"]["data"] == model.predict(rows).tolist()


def test_raw_onnx_graph_with_two_inputs_and_a_version(srv):
    _, w = affine_graph()
    a = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    b = np.ones((3, 2), np.float32)
    body = {"inputs": [{"name": "a", "shape": [3, 4], "datatype": "FP32", "data": a.tolist()},
                       {"name": "b", "shape": [3, 2], "datatype": "FP32", "data": b.ravel().tolist()}],
            "outputs": [{"name": "y"}]}
    r = httpx.post(srv.url + "/v2/models/affine/versions/3/infer", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    (y,) = r.json()["outputs"]
    assert y["name"] == "y" and y["shape"] == [3, 2]
    np.testing.assert_allclose(np.array(y["data"]).reshape(3, 2), a @ w + b, rtol=1e-5)
    r = httpx.post(srv.url + "/v2/models/affine/versions/1/infer", json=body, headers=AUTH)
    assert r.status_code == 404 and r.json() == {"error": "model 'affine' has no version '1'"}


def test_tritonclient_works_unchanged(srv, fraud_model):
    model, x = fraud_model
    c = client(srv)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("fraud", headers=auth()) and c.is_model_ready("affine", "3", headers=auth())
    meta = c.get_model_metadata("fraud", headers=auth())
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 20]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    config = c.get_model_config("fraud", headers=auth())
    assert config["max_batch_size"] == 64 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 3000
    for binary in (True, False):  # Triton's binary tensor extension, and plain JSON
        tensor = triton.InferInput("input", [4, 20], "FP32")
        tensor.set_data_from_numpy(x[40:44], binary_data=binary)
        wanted = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
        result = c.infer("fraud", [tensor], outputs=wanted, request_id=f"tc-{binary}", headers=auth())
        np.testing.assert_allclose(result.as_numpy("probabilities"), model.predict_proba(x[40:44]), atol=1e-5)
        assert result.as_numpy("label") is None and result.get_response()["id"] == f"tc-{binary}"
    tensor = triton.InferInput("input", [2, 20], "FP32")
    tensor.set_data_from_numpy(x[:2])
    result = c.infer("fraud", [tensor], headers=auth())  # no outputs named: all of them, binary
    np.testing.assert_array_equal(result.as_numpy("label"), model.predict(x[:2]))
    bad = triton.InferInput("input", [1, 19], "FP32")
    bad.set_data_from_numpy(x[:1, :19])
    with pytest.raises(InferenceServerException) as e:
        c.infer("fraud", [bad], headers=auth())
    assert e.value.status() == "400" and "input 'input'" in e.value.message()
    c.close()


@pytest.mark.parametrize("body, message", [
    ({"inputs": [{"name": "input", "shape": [1, 21], "datatype": "FP32", "data": [0.0] * 21}]},
     "unexpected shape for input 'input' for model 'fraud'. Expected [-1, 20], got [1, 21]"),
    ({"inputs": [{"name": "input", "shape": [1, 20], "datatype": "FP64", "data": [0.0] * 20}]},
     "unexpected datatype FP64 for inference input 'input', expecting FP32"),
    ({"inputs": [{"name": "features", "shape": [1, 20], "datatype": "FP32", "data": [0.0] * 20}]},
     "unexpected inference input 'features' for model 'fraud'"),
    ({"inputs": [{"name": "input", "shape": [1, 20], "datatype": "FP32", "data": [0.0] * 19}]},
     "input 'input': 19 values in data for shape [1, 20], expected 20"),
    ({"inputs": [{"name": "input", "shape": [65, 20], "datatype": "FP32", "data": [0.0] * 1300}]},
     "batch-size must be <= 64"),
    ({"inputs": []}, "request.inputs: must be a non-empty list"),
])
def test_requests_that_do_not_fit_get_400_naming_the_input(srv, body, message):
    r = httpx.post(srv.url + "/v2/models/fraud/infer", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and message in r.json()["error"]


def test_unknown_models_and_models_that_are_not_tensor_models(srv):
    for r in (httpx.post(srv.url + "/v2/models/nope/infer", json={"inputs": []}, headers=AUTH),
              httpx.get(srv.url + "/v2/models/nope", headers=AUTH)):
        assert r.status_code == 404 and "'nope' does not exist" in r.json()["error"]
    text = httpx.get(srv.url + "/metrics").text
    assert 'model_name="nope"' not in text  # a name a client made up is no metric label
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "fraud", "messages": []}, headers=AUTH)
    assert r.status_code == 400


def test_infer_paths_of_the_hot_path():
    assert infer_path_params("/v2/models/fraud/infer") == {"name": "fraud"}
    assert infer_path_params("/v2/models/fraud/versions/2/infer") == {"name": "fraud", "version": "2"}
    for path in ["/v2/models//infer", "/v2/models/fraud/x/infer", "/v2/models/fraud/versions//infer",
                 "/v2/models/fraud/infer/", "/v1/models/fraud/infer", "/v2/models/infer"]:
        assert infer_path_params(path) is None, path


def test_paths_that_are_not_infer_calls_reach_the_app(srv):
    x = np.zeros((1, 20), np.float32)
    r = httpx.post(srv.url + "/v2/models/fraud/x/infer", json=infer_body(x), headers=AUTH)
    assert r.status_code == 404
    r = httpx.get(srv.url + "/v2/models/fraud/infer", headers=AUTH)
    assert r.status_code == 405
    r = httpx.post(srv.url + "/v2/models/fraud/infer", json=infer_body(x), headers={**AUTH, "X-Request-Id": "row-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "row-1"
    assert float(r.headers["x-inferd-overhead-ms"]) >= 0


def test_a_key_is_required_once_keys_exist_but_probes_are_public(srv):
    x = np.zeros((1, 20), np.float32)
    assert httpx.post(srv.url + "/v2/models/fraud/infer", json=infer_body(x)).status_code == 401
    assert httpx.get(srv.url + "/v2/models/fraud").status_code == 401
    assert httpx.post(srv.url + "/v2/models/fraud/infer", json=infer_body(x),
                      headers={"Authorization": "Bearer sk-inferd-wrong"}).status_code == 401
    assert httpx.get(srv.url + "/v2/health/live").status_code == 200
    assert httpx.get(srv.url + "/v2/health/ready").status_code == 200


def test_each_infer_call_is_one_ledger_row_priced_per_prediction(srv, fraud_model):
    _, x = fraud_model
    r = httpx.post(srv.url + "/admin/keys", json={"team": "risk"}, headers=AUTH)
    key = r.json()["key"]
    ids = {f"ledger-{i}" for i in range(5)}
    for i, rid in enumerate(sorted(ids)):
        r = httpx.post(srv.url + "/v2/models/fraud/infer", json=infer_body(x[:i + 1]),
                       headers={"Authorization": f"Bearer {key}", "x-request-id": rid})
        assert r.status_code == 200 and r.headers["x-inferd-deployment"] == "fraud/0"
    bad = "ledger-bad"
    r = httpx.post(srv.url + "/v2/models/fraud/infer", json=infer_body(np.zeros((1, 3), np.float32)),
                   headers={"Authorization": f"Bearer {key}", "x-request-id": bad})
    assert r.status_code == 400
    rows = wait_for(lambda: (lambda got: got if len(got) == 6 else None)(ledger(srv, ids | {bad})))
    by_id = {row.request_id: row for row in rows}
    for i, rid in enumerate(sorted(ids)):
        row = by_id[rid]
        assert (row.endpoint, row.team, row.model, row.served_model, row.status) == \
            ("infer", "risk", "fraud", "fraud", 200)
        assert row.cost_usd == pytest.approx((i + 1) * PRICE_PER_1K / 1000)
        assert row.prompt_tokens == row.completion_tokens == 0 and row.predictions == i + 1
    assert by_id[bad].status == 400 and by_id[bad].cost_usd == 0 and by_id[bad].predictions == 0


def test_team_rate_limits_apply(srv):
    r = httpx.put(srv.url + "/admin/teams/slow", json={"rpm": 2}, headers=AUTH)
    assert r.status_code in (200, 201), r.text
    key = httpx.post(srv.url + "/admin/keys", json={"team": "slow"}, headers=AUTH).json()["key"]
    x = np.zeros((1, 20), np.float32)
    statuses = [httpx.post(srv.url + "/v2/models/fraud/infer", json=infer_body(x),
                           headers={"Authorization": f"Bearer {key}"}) for _ in range(3)]
    assert [s.status_code for s in statuses] == [200, 200, 429]
    assert "error" in statuses[2].json() and int(statuses[2].headers["Retry-After"]) >= 1


def _histogram(srv, name: str, model: str) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics").text
    out = {}
    for le, value in re.findall(rf'^{re.escape(name)}_bucket\{{le="([^"]+)",model_name="{model}"\}} (\S+)$',
                                text, re.M):
        out[le] = float(value)
    return out


def test_concurrent_single_rows_are_batched(srv, fraud_model):
    model, x = fraud_model
    before = _histogram(srv, "inferd:infer_batch_size", "fraud")

    async def go():
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as c:
            return await asyncio.gather(*(c.post(srv.url + "/v2/models/fraud/infer", json=infer_body(x[i:i + 1]))
                                          for i in range(48)))

    responses = asyncio.run(go())
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        probabilities = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"]
        np.testing.assert_allclose(probabilities, model.predict_proba(x[i:i + 1])[0], atol=1e-5)
    after = _histogram(srv, "inferd:infer_batch_size", "fraud")
    runs = after["+Inf"] - before.get("+Inf", 0)
    single = after["1.0"] - before.get("1.0", 0)
    assert 0 < runs < 48 and single < runs, (runs, single)  # fewer runs than requests; some held > 1 row
    text = httpx.get(srv.url + "/metrics").text
    assert 'inferd:infer_queue_duration_seconds_count{model_name="fraud"}' in text
    assert 'inferd:infer_requests_total{model_name="fraud",status="200"}' in text
