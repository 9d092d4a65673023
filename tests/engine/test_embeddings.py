"""Embeddings: the Embedder, LLM.embed and AsyncEmbedder against sentence-transformers.

The bundled all-MiniLM-L6-v2 is checked against `SentenceTransformer.encode` on
varied texts; tiny random BERTs built here cover each pooling mode, Matryoshka
sizes and the directory layouts. The model is loaded once per module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from inferd import LLM, InvalidParameterError
from inferd.engine.client.async_client import EngineDeadError
from inferd.engine.embedding.client import AsyncEmbedder
from inferd.engine.embedding.embedder import Embedder
from inferd.engine.embedding.spec import EmbedConfig, is_embedding_model
from inferd.models.default_embedding_model import default_embedding_model_path
from tests.tiny_bert import build_tiny_bert

TEXTS = [
    "", " ", "   \t\n  ", "a", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?", "Paris is the capital and largest city of France.",
    "!!!!!!!!!!!!!!!!!!!!!!!!", "?!?!?!?!... ... ;;;; ,,,, ----", "$$$ 100% @home #tags & more",
    "Grüße aus Köln — ünïcödé façade naïve coöperate", "¿Dónde está la biblioteca? ¡Aquí!",
    "Съешь же ещё этих мягких французских булок", "Η γρήγορη καφέ αλεπού", "日本語のテキストを埋め込みます。",
    "我爱自然语言处理和机器学习", "한국어 문장도 처리할 수 있습니다", "مرحبا بالعالم", "שלום עולם",
    "नमस्ते दुनिया", "emoji only 🙂🚀🔥👍🏽", "🙂", "👨‍👩‍👧‍👦 family", "mixed 中文 English 日本語 한국어 123",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "SELECT * FROM users WHERE id = 42;",
    '{"key": "value", "list": [1, 2, 3]}', "https://example.com/path?query=1&other=two#frag",
    "e = mc^2; ∑ x_i ≥ ∫ f(x) dx ≠ ∞", "UPPER CASE TEXT SHOULD MATCH lower case text",
    "tab\tseparated\tvalues", "line one\nline two\r\nline three", "a b c d e f g h i j k l m n o p",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "The mitochondria is the powerhouse of the cell.", "I love cats.", "I adore felines.",
    "Stock markets fell sharply on Monday.", "The weather today is sunny with a light breeze.",
    "0123456789 3.14159 2.71828 1e-9", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "zero\u200bwidth\u200bspace",
    "control\x07chars\x1b[0m here", "repeated repeated repeated repeated repeated words",
    "...", "'quoted' \"double\" `back`", "Ünïcödé ÀÉÎÕÜ àéîõü ßøåæ", "— – - … · • ‹› «» „“",
    "A much longer sentence " + "that keeps going and going " * 8 + "until it ends.",
]
LONG_TEXT = "The history of the world, told in many words. " * 80  # > 256 tokens
assert len(TEXTS) == 50


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def minilm():
    return Embedder(num_threads=1)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_embedding_model_path()), device="cpu")


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """Tiny BERT directory with sentence-transformers files: CLS pooling, normalized."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-st"), pooling="cls", normalize=True,
                           max_seq_length=24)


# -- the bundled model against sentence-transformers ---------------------------------------

def test_default_model_facts(minilm):
    assert (minilm.model_name, minilm.dimension, minilm.max_len) == ("all-MiniLM-L6-v2", 384, 256)
    assert minilm.spec.pooling == "mean" and minilm.spec.normalize


def test_matches_sentence_transformers(minilm, reference):
    texts = TEXTS[:-1] + [LONG_TEXT]
    ours = minilm.embed(texts, truncate=True)
    theirs = reference.encode(texts, convert_to_numpy=True)
    assert ours.vectors.dtype == np.float32 and ours.vectors.shape == (50, 384)
    assert _cos(ours.vectors, theirs).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours.vectors, axis=1), 1.0, atol=1e-5)
    # token counts include [CLS] and [SEP]; whitespace-only text is just those two
    expected = [len(reference.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts]
    assert ours.num_tokens == expected
    assert ours.num_tokens[:3] == [2, 2, 2] and ours.num_tokens[-1] == 256


def test_llm_embed_matches_sentence_transformers(minilm, reference):
    llm = LLM("default-embedding", num_threads=1)
    outs = llm.embed(TEXTS)
    theirs = reference.encode(TEXTS, convert_to_numpy=True)
    vectors = np.array([o.outputs.embedding for o in outs], dtype=np.float32)
    assert isinstance(outs[0].outputs.embedding, list) and isinstance(outs[0].outputs.embedding[0], float)
    assert _cos(vectors, theirs).min() >= 0.9999
    assert outs[5].prompt_token_ids == minilm.tokenizer.encode(TEXTS[5])[0]
    with pytest.raises(ValueError, match="embedding model"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="embedding model"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_result_does_not_depend_on_the_batch(minilm):
    together = minilm.embed(TEXTS[:12]).vectors
    alone = np.stack([minilm.embed(t).vectors[0] for t in TEXTS[:12]])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_token_ids_are_used_as_given(minilm):
    ids = minilm.tokenizer.encode(["Hello, world!"])[0]
    np.testing.assert_array_equal(minilm.embed([ids]).vectors, minilm.embed(["Hello, world!"]).vectors)
    assert minilm.embed(ids).num_tokens == [len(ids)]  # one id list is one input
    assert minilm.embed([[101] * 300], truncate=True).num_tokens == [256]


def test_errors(minilm):
    with pytest.raises(InvalidParameterError, match="input\\[1\\] has 8.. tokens, more than the maximum of 256") as e:
        minilm.embed(["short", LONG_TEXT])
    assert e.value.param == "input"
    with pytest.raises(InvalidParameterError, match="300 tokens"):
        minilm.embed([[101] * 300])
    with pytest.raises(InvalidParameterError, match="only 384 \\(it is not a Matryoshka model\\)") as e:
        minilm.embed(["a"], dimensions=128)
    assert e.value.param == "dimensions"
    assert minilm.embed(["a"], dimensions=384).vectors.shape == (1, 384)
    for bad in ([], ["a", [1, 2]], [[]], [[1, 10**9]], [[1.5]], None):
        with pytest.raises(InvalidParameterError) as e:
            minilm.embed(bad)
        assert e.value.param == "input"


# -- tiny models: pooling modes, layouts, Matryoshka ---------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "max", "lasttoken", "mean_sqrt_len_tokens"])
def test_pooling_modes_match_sentence_transformers(tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    path = build_tiny_bert(tmp_path / pooling, pooling=pooling, normalize=pooling == "mean")
    texts = TEXTS[3:12] + ["Grüße aus Köln"]
    ours = Embedder(path, num_threads=1).embed(texts).vectors
    theirs = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_sentence_transformers_config_is_read(tiny_st):
    from sentence_transformers import SentenceTransformer

    emb = Embedder(tiny_st, num_threads=1)
    assert (emb.spec.pooling, emb.spec.normalize, emb.max_len, emb.model_name) == ("cls", True, 24, "tiny-st0")
    texts = ["The quick brown fox", "x " * 40]
    theirs = SentenceTransformer(str(tiny_st), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(emb.embed(texts, truncate=True).vectors, theirs, atol=1e-5)


def test_plain_directory_mean_pools_without_normalizing(tmp_path):
    import torch
    import transformers

    path = build_tiny_bert(tmp_path / "plain", masked_lm=True)
    emb = Embedder(path, num_threads=1)
    assert (emb.spec.pooling, emb.spec.normalize, emb.max_len) == ("mean", False, 64)
    assert is_embedding_model(str(path)) and LLM(str(path), num_threads=1).embedder is not None
    ids = emb.tokenizer.encode(["The quick brown fox"])
    ref = transformers.BertForMaskedLM.from_pretrained(path, dtype=torch.float32).bert.eval()
    with torch.inference_mode():
        expected = ref(torch.tensor(ids)).last_hidden_state.mean(1).numpy()
    np.testing.assert_allclose(emb.embed_ids(ids), expected, atol=1e-5)


def test_matryoshka_dimensions(tmp_path):
    path = build_tiny_bert(tmp_path / "mrl", pooling="mean", normalize=True,
                           config_extra={"matryoshka_dimensions": [16, 32]})
    emb = Embedder(path, num_threads=1)
    full = emb.embed(["The quick brown fox"]).vectors
    cut = emb.embed(["The quick brown fox"], dimensions=16).vectors
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-6)
    with pytest.raises(InvalidParameterError, match="one of 16, 32, 64"):
        emb.embed(["x"], dimensions=20)


def test_generation_model_is_not_an_embedding_model(tiny_llama):
    assert not is_embedding_model(str(tiny_llama)) and not is_embedding_model(None)
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes="4MiB", progress=False)
    with pytest.raises(ValueError, match="needs an embedding model"):
        llm.embed(["hello"])


# -- the process boundary -------------------------------------------------------------------

def test_async_embedder_batches_concurrent_requests(minilm):
    texts = [TEXTS[i % 50] for i in range(32)]

    async def main():
        client = await AsyncEmbedder(EmbedConfig(num_threads=1)).start()
        try:
            assert (client.model_name, client.dimension, client.max_len) == ("all-MiniLM-L6-v2", 384, 256)
            results = await asyncio.gather(*(client.embed([t]) for t in texts))
            bad = await asyncio.gather(client.embed(["ok"]), client.embed([LONG_TEXT]),
                                       client.embed(["x"], dimensions=3), return_exceptions=True)
            return results, bad, client.stats, client.is_healthy
        finally:
            await client.shutdown()

    results, bad, stats, healthy = asyncio.run(main())
    assert healthy
    direct = minilm.embed(texts)
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.vectors[0], direct.vectors[i], atol=1e-5)
        assert r.num_tokens == [direct.num_tokens[i]]
    assert stats.num_requests == 33 and stats.num_batches < stats.num_requests
    assert stats.mean_batch_size > 1
    assert bad[0].vectors.shape == (1, 384)
    assert isinstance(bad[1], InvalidParameterError) and bad[1].param == "input"
    assert isinstance(bad[2], InvalidParameterError) and bad[2].param == "dimensions"


def test_async_embedder_fails_fast_when_its_process_dies(tiny_st):
    async def main():
        client = await AsyncEmbedder(EmbedConfig(model=str(tiny_st), num_threads=1)).start()
        try:
            assert (await client.embed(["hello"])).vectors.shape == (1, 64)
            os.kill(client._proc.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(EngineDeadError):
                for _ in range(100):  # until the watcher has seen the exit
                    await client.embed(["hello"])
                    await asyncio.sleep(0.02)
            assert time.monotonic() - started < 3
            assert not client.is_healthy
            with pytest.raises(EngineDeadError):
                await client.embed(["again"])
        finally:
            await client.shutdown()

    asyncio.run(main())


def test_async_embedder_refuses_a_missing_model_before_spawning(tmp_path):
    client = AsyncEmbedder(EmbedConfig(model=str(tmp_path / "nope"), num_threads=1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        asyncio.run(client.start())
    assert client._proc is None
