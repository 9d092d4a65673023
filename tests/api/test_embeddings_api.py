"""/v1/embeddings on a server that runs a chat model and an embedding model side by side.

The server is started the way a user would: `inferd serve MODEL --embedding-model
default-embedding`. Vectors over HTTP must equal the offline `Embedder`'s (which
tests/engine/test_embeddings.py checks against sentence-transformers), in float
and base64; errors are 400s that say what is wrong; 32 concurrent clients are
served in fewer batches than requests.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest

from tests.api.conftest import MODEL, ServerProc

EMBED = "all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "Ein Hund läuft im Park.", "数据库索引", "", "🙂 ok"]


@pytest.fixture(scope="module")
def both(tiny_llama):
    srv = ServerProc(tiny_llama, "--embedding-model", "default-embedding", api_key=None).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference():
    from inferd.engine.embedding.embedder import Embedder

    return Embedder(None, num_threads=1)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_models_lists_both_and_each_request_goes_to_its_model(both):
    client = both.client()
    assert {m.id for m in client.models.list().data} == {MODEL, EMBED}
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          extra_body={"ignore_eos": True})  # a sampled EOS could end it after 1
    assert chat.model == MODEL and chat.usage.completion_tokens == 2
    emb = client.embeddings.create(model=EMBED, input="hello")
    assert emb.model == EMBED and len(emb.data[0].embedding) == 384


def test_float_and_base64_match_the_offline_embedder(both, reference):
    client = both.client()
    expected = reference.embed(TEXTS).vectors
    floats = client.embeddings.create(model=EMBED, input=TEXTS)
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    for d, want in zip(floats.data, expected):
        assert cosine(d.embedding, want) >= 0.99999
    raw = httpx.post(both.url + "/v1/embeddings", json={"model": EMBED, "input": TEXTS,
                                                        "encoding_format": "base64"}).json()
    for d, want in zip(raw["data"], expected):
        vec = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        assert cosine(vec, want) >= 0.99999
    sdk_b64 = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="base64")
    vec = np.frombuffer(base64.b64decode(sdk_b64.data[1].embedding), dtype="<f4")
    assert cosine(vec, expected[1]) >= 0.99999
    assert floats.usage.prompt_tokens == reference.embed(TEXTS).total_tokens == floats.usage.total_tokens


def test_token_id_inputs(both, reference):
    ids = reference.embed(["token ids work"]).token_ids[0]
    client = both.client()
    one = client.embeddings.create(model=EMBED, input=ids)
    many = client.embeddings.create(model=EMBED, input=[ids, ids])
    want = reference.embed(["token ids work"]).vectors[0]
    assert cosine(one.data[0].embedding, want) >= 0.99999 and len(many.data) == 2


def test_errors_are_400s_that_say_what_is_wrong(both):
    client = both.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED, input="x", dimensions=128)
    assert e.value.body["param"] == "dimensions" and "384" in e.value.body["message"]
    long_text = "word " * 2000
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED, input=long_text)
    assert e.value.body["param"] == "input"
    ok = httpx.post(both.url + "/v1/embeddings", json={"model": EMBED, "input": long_text, "truncate": True})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] <= 512
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED, input=[])
    with pytest.raises(openai.BadRequestError):  # a chat model does not embed
        client.embeddings.create(model=MODEL, input="x")
    assert httpx.get(both.url + "/health").status_code == 200


def test_concurrent_clients_are_batched_together(both, reference):
    def total(name: str) -> float:
        for line in httpx.get(both.url + "/metrics").text.splitlines():
            if line.startswith(f'inferd:{name}_total{{model_name="{EMBED}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before_requests, before_batches = total("embedding_requests"), total("embedding_batches")
    texts = [f"sentence number {i} about caching" for i in range(32)]

    async def run():
        async with openai.AsyncOpenAI(base_url=both.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(client.embeddings.create(model=EMBED, input=t) for t in texts))

    results = asyncio.run(run())
    expected = reference.embed(texts).vectors
    for r, want in zip(results, expected):
        assert cosine(r.data[0].embedding, want) >= 0.99999
    requests = total("embedding_requests") - before_requests
    batches = total("embedding_batches") - before_batches
    assert requests == 32 and batches < 32
