"""Scoring a JSONL file of rows through the Batch API: lines for a tensor model's infer url.

Against a real `inferd serve` with the fraud model: every line's output equals the model's own
predict_proba on its rows, a line that does not fit the model lands in the error file with the
protocol's message, a line that asks for binary output fails alone (JSONL holds no binary), and each
answered line is one ledger row with the batch's id, priced per prediction at the batch discount.
"""

from __future__ import annotations

import io
import json

import numpy as np
import openai
import pytest

from inferd.store import open_store
from inferd.tenancy.ledger import select
from tests.api.conftest import wait_for
from tests.classic.conftest import ADMIN, PRICE_PER_1K
from tests.classic.test_infer_api import infer_body

URL = "/v2/models/fraud/infer"


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=ADMIN, max_retries=0)


def upload(c: openai.OpenAI, lines: list[dict]):
    data = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
    return c.files.create(file=("rows.jsonl", io.BytesIO(data)), purpose="batch")


def test_rows_scored_through_the_batch_api(srv, fraud_model):
    model, x = fraud_model
    sizes = [1, 3, 2, 1, 4]
    chunks = np.split(x[:sum(sizes)], np.cumsum(sizes)[:-1])
    lines = [{"custom_id": f"rows-{i}", "method": "POST", "url": URL, "body": infer_body(rows)}
             for i, rows in enumerate(chunks)]
    lines.append({"custom_id": "misfit", "method": "POST", "url": URL,
                  "body": infer_body(np.zeros((1, 3), np.float32))})
    c = client(srv)
    batch = c.batches.create(input_file_id=upload(c, lines).id, endpoint=URL, completion_window="24h")
    done = wait_for(lambda: (lambda b: b if b.status in ("completed", "failed", "expired") else None)(
        c.batches.retrieve(batch.id)), timeout=60)
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (5, 1)

    outputs = {o["custom_id"]: o for o in map(json.loads, c.files.content(done.output_file_id).text.splitlines())}
    assert set(outputs) == {f"rows-{i}" for i in range(len(chunks))}
    for i, rows in enumerate(chunks):
        response = outputs[f"rows-{i}"]["response"]
        assert response["status_code"] == 200
        probs = next(o for o in response["body"]["outputs"] if o["name"] == "probabilities")
        got = np.asarray(probs["data"], np.float32).reshape(probs["shape"])
        np.testing.assert_allclose(got, model.predict_proba(rows), atol=1e-5)
    (error,) = map(json.loads, c.files.content(done.error_file_id).text.splitlines())
    assert error["custom_id"] == "misfit" and error["response"]["status_code"] == 400
    assert "input" in json.dumps(error["response"]["body"])

    store = open_store(srv.store_url)
    try:
        rows = store.run_sync(lambda tx: select(tx, "batch_id = ?", (batch.id,)))
    finally:
        store.close()
    answered = sorted((r for r in rows if r.status == 200), key=lambda r: r.predictions)
    assert [r.predictions for r in answered] == sorted(sizes)
    assert len(rows) == len(lines) and {r.endpoint for r in rows} == {"infer"}
    for r in answered:  # the batch discount (0.5 by default) on the price per 1,000 predictions
        assert r.cost_usd == pytest.approx(r.predictions * PRICE_PER_1K / 1000 * 0.5)


def test_a_line_that_asks_for_binary_output_fails_alone(srv, fraud_model):
    _, x = fraud_model
    c = client(srv)
    binary = infer_body(x[:1], outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])
    lines = [{"custom_id": "ok", "method": "POST", "url": URL, "body": infer_body(x[:1])},
             {"custom_id": "binary", "method": "POST", "url": URL, "body": binary}]
    batch = c.batches.create(input_file_id=upload(c, lines).id, endpoint=URL, completion_window="24h")
    done = wait_for(lambda: (lambda b: b if b.status == "completed" else None)(c.batches.retrieve(batch.id)),
                    timeout=60)
    (error,) = map(json.loads, c.files.content(done.error_file_id).text.splitlines())
    assert error["custom_id"] == "binary" and "binary" in error["response"]["body"]["error"]["message"]


def test_urls_that_are_no_batch_endpoint_are_refused(srv):
    c = client(srv)
    with pytest.raises(openai.BadRequestError, match="url must be one of"):
        upload(c, [{"custom_id": "a", "method": "POST", "url": "/v2/models/fraud/ready", "body": {}}])
    good = upload(c, [{"custom_id": "a", "method": "POST", "url": URL, "body": {"inputs": []}}])
    with pytest.raises(openai.BadRequestError, match="endpoint must be one of"):
        c.batches.create(input_file_id=good.id, endpoint="/v2/models/fraud", completion_window="24h")
