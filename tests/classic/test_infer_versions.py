"""Model versions for tensor models: a retrained fraud model deployed as a canary, promoted and
rolled back through the admin API while `/v2/models/fraud/infer` keeps answering.

Against a real `inferd serve`: each answer names the version that scored it (the
`x-inferd-model-version` header), its predictions are that version's model's own, the ledger
row carries the version, and a canary is sticky per key.
"""

from __future__ import annotations

import httpx
import joblib
import numpy as np

from inferd.classic.examples import train_fraud
from inferd.store import open_store
from inferd.tenancy.ledger import select
from tests.classic.conftest import ADMIN
from tests.classic.test_infer_api import AUTH, infer_body


def admin(srv, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, srv.url + path, headers=AUTH, timeout=120, **kw)


def score(srv, x: np.ndarray, key: str = ADMIN) -> tuple[str, np.ndarray, str]:
    r = httpx.post(srv.url + "/v2/models/fraud/infer", json=infer_body(x), timeout=30,
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
    return r.headers["x-inferd-model-version"], np.asarray(probs["data"]).reshape(probs["shape"]), \
        r.headers["x-request-id"]


def test_a_retrained_tensor_model_rolls_out_and_back(srv, fraud_model, model_dir, tmp_path):
    old, x = fraud_model
    new = train_fraud(x, (x[:, 0] > 0).astype(int), n_estimators=5, seed=9)  # another model, other answers
    joblib.dump(new, tmp_path / "fraud-v2.joblib")
    rows = x[:4]
    assert not np.allclose(old.predict_proba(rows), new.predict_proba(rows), atol=1e-3)

    r = admin(srv, "POST", "/admin/models/fraud/deploy", json={"spec": {
        "provider": "onnx", "model": str(tmp_path / "fraud-v2.joblib"), "max_batch_size": 64}, "canary": 50})
    assert r.status_code == 200, r.text
    assert (r.json()["stable"], r.json()["canary"]) == ("v1", "v2")

    keys = [httpx.post(srv.url + "/admin/keys", json={"team": "risk"}, headers=AUTH).json()["key"]
            for _ in range(12)]
    seen: dict[str, set[str]] = {}
    versions_by_id: dict[str, str] = {}
    for _ in range(2):
        for key in keys:
            version, probs, rid = score(srv, rows, key)
            expected = (old if version == "v1" else new).predict_proba(rows)
            np.testing.assert_allclose(probs, expected, atol=1e-5)      # each version scores with its own model
            seen.setdefault(key, set()).add(version)
            versions_by_id[rid] = version
    assert all(len(v) == 1 for v in seen.values()) and set().union(*seen.values()) == {"v1", "v2"}

    assert admin(srv, "POST", "/admin/models/fraud/promote").status_code == 200
    assert score(srv, rows)[0] == "v2"
    assert admin(srv, "POST", "/admin/models/fraud/rollback", json={"reason": "worse precision"}).status_code == 200
    version, probs, _ = score(srv, rows)
    assert version == "v1"
    np.testing.assert_allclose(probs, old.predict_proba(rows), atol=1e-5)

    store = open_store(srv.store_url)
    try:
        ledger = store.run_sync(lambda tx: select(tx, "endpoint = ?", ("infer",)))
    finally:
        store.close()
    found = {row.request_id: row.model_version for row in ledger if row.request_id in versions_by_id}
    assert found == versions_by_id
