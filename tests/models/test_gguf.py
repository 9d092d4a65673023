"""GGUF loading: dequantization, names and q/k layout, config, tokenizer, cache.

Tiny GGUF files are written here with gguf-py's GGUFWriter; the real default
model (SmolLM2-135M Q4_1) is compared against what transformers makes of the
same file, for both the tokenizer and the dequantized weights.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from inferd.models import gguf_loader
from inferd.models.gguf_loader import load_gguf
from inferd.models.gguf_quants import dequantize
from inferd.models.gguf_tokenizer import build_tokenizer_spec, bytes_to_unicode

Q = gguf.GGMLQuantizationType


# -- dequantization -----------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16])
def test_dequantize_matches_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((6, 96)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block (scale 0)
    raw = gguf.quants.quantize(data, qtype)
    want = gguf.quants.dequantize(raw, qtype)
    got = dequantize(torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8)), qtype.name, (6, 96))
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(np.asarray(want, dtype=np.float32)))


def test_q4_nibble_order():
    # Byte j holds element j (low nibble) and element j + 16 (high nibble).
    block = bytes([0x00, 0x3C]) + bytes((j + 1) % 16 | (15 - j) << 4 for j in range(16))
    got = dequantize(torch.tensor(list(block), dtype=torch.uint8), "Q4_0", (32,))
    want = [((j + 1) % 16) - 8 for j in range(16)] + [(15 - j) - 8 for j in range(16)]
    assert got.tolist() == [float(v) for v in want]


# -- tiny GGUF files ----------------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 96, 4, 2, 16, 2


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gpt2_vocab():
    letters = [bytes_to_unicode()[b] for b in range(256)]
    merged = ["he", "ll", "hell", "hello", "Ġhello"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"] + letters + merged
    types = [3, 3, 3, 4] + [1] * (len(letters) + len(merged))
    merges = ["h e", "l l", "he ll", "hell o", "Ġ hello"]
    return tokens, types, merges


def write_tiny_gguf(
    path: Path, arch: str = "llama", *, qk_type=Q.F32, tied: bool = True, extra=None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write a tiny random model; returns its HF-layout weights by HF name."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = _gpt2_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_eot_token_id(2)
    w.add_chat_template("{{ messages }}")
    if extra:
        extra(w)

    hf: dict[str, np.ndarray] = {}

    def put(gguf_name, hf_name, arr, qtype=Q.F32, permute_heads=None):
        arr = arr.astype(np.float32)
        stored = _permute(arr, permute_heads) if permute_heads else arr
        if qtype == Q.F32:
            w.add_tensor(gguf_name, stored)
        else:
            raw = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gguf_name, raw, raw_dtype=qtype)
            # what the file really holds, in HF layout (quantization is per row,
            # so it commutes with the row permutation)
            arr = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
        hf[hf_name] = arr

    permuted = arch in ("llama", "mistral")
    put("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((vocab, HIDDEN)), Q.Q8_0)
    for i in range(LAYERS):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        put(p + "attn_norm.weight", h + "input_layernorm.weight", rng.standard_normal(HIDDEN))
        put(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", rng.standard_normal(HIDDEN))
        for g, n, rows, heads in (
            ("attn_q", "q_proj", HEADS * HEAD_DIM, HEADS),
            ("attn_k", "k_proj", KV_HEADS * HEAD_DIM, KV_HEADS),
            ("attn_v", "v_proj", KV_HEADS * HEAD_DIM, None),
        ):
            qtype = qk_type if heads else Q.Q4_0
            put(f"{p}{g}.weight", f"{h}self_attn.{n}.weight", rng.standard_normal((rows, HIDDEN)),
                qtype, heads if permuted else None)
            if arch == "qwen2":
                put(f"{p}{g}.bias", f"{h}self_attn.{n}.bias", rng.standard_normal(rows))
        if arch == "qwen3":
            put(p + "attn_q_norm.weight", h + "self_attn.q_norm.weight", rng.standard_normal(HEAD_DIM))
            put(p + "attn_k_norm.weight", h + "self_attn.k_norm.weight", rng.standard_normal(HEAD_DIM))
        put(p + "attn_output.weight", h + "self_attn.o_proj.weight",
            rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)), Q.Q4_1)
        put(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", rng.standard_normal((FFN, HIDDEN)), Q.Q4_1)
        put(p + "ffn_up.weight", h + "mlp.up_proj.weight", rng.standard_normal((FFN, HIDDEN)), Q.Q8_0)
        put(p + "ffn_down.weight", h + "mlp.down_proj.weight", rng.standard_normal((HIDDEN, FFN)), Q.Q4_0)
    put("output_norm.weight", "model.norm.weight", rng.standard_normal(HIDDEN))
    if not tied:
        put("output.weight", "lm_head.weight", rng.standard_normal((vocab, HIDDEN)), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize(
    "arch, qk_type", [("llama", Q.F32), ("llama", Q.Q8_0), ("llama", Q.Q4_1), ("mistral", Q.Q4_0)]
)
def test_tiny_llama_roundtrip(tmp_path, arch, qk_type):
    # q/k are written permuted the way llama.cpp's converter does; reading them
    # back must give the original (HF layout) rows.
    path = tmp_path / "tiny.gguf"
    want = write_tiny_gguf(path, arch, qk_type=qk_type)
    ck = load_gguf(path, cache_dir=False, progress=False)
    c = ck.config
    cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[arch]
    assert c["architectures"] == [cls] and c["model_type"] == arch
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert c["rms_norm_eps"] == 1e-6 and c["rope_theta"] == 10000.0
    assert c["max_position_embeddings"] == 256 and c["vocab_size"] == len(_gpt2_vocab()[0])
    assert c["tie_word_embeddings"] is True and c["rope_scaling"] is None
    assert c["attention_bias"] is False
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 0)
    assert set(ck.tensors) == set(want)
    for name, arr in want.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == arr.shape, name
        assert torch.equal(got, torch.from_numpy(np.asarray(arr, dtype=np.float32))), name


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_qwen_not_unpermuted(tmp_path, arch):
    path = tmp_path / "tiny.gguf"
    want = write_tiny_gguf(path, arch, tied=False)
    ck = load_gguf(path, cache_dir=False, progress=False)
    cls = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert ck.config["architectures"] == [cls] and ck.config["model_type"] == arch
    assert ck.config["attention_bias"] is (arch == "qwen2")
    assert ck.config["tie_word_embeddings"] is False
    assert set(ck.tensors) == set(want) and "lm_head.weight" in want
    for name, arr in want.items():
        assert torch.equal(ck.tensors[name], torch.from_numpy(np.asarray(arr, dtype=np.float32))), name


def test_tiny_tokenizer_spec(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    spec = load_gguf(path, cache_dir=False, progress=False).tokenizer
    assert (spec.bos_token, spec.eos_token, spec.pad_token) == ("<|im_start|>", "<|endoftext|>", None)
    assert spec.add_bos_token is False and spec.add_eos_token is False
    assert spec.eos_token_ids == [0, 2] and spec.chat_template == "{{ messages }}"
    tok = Tokenizer.from_str(spec.tokenizer_json)
    text = "<|im_start|>hello hello<think>x<|im_end|>"
    ids = tok.encode(text).ids
    vocab = {t: i for i, t in enumerate(_gpt2_vocab()[0])}
    assert ids == [1, vocab["hello"], vocab["Ġhello"], 3, vocab["x"], 2]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "hello hello<think>x"  # control tokens skipped, user-defined kept


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "bad.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_head_count(4)
    w.add_feed_forward_length(256)
    tokens, types, merges = _gpt2_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), 256)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.zeros((1, 144), np.uint8), raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"blk\.0\.attn_norm\.weight.*Q4_K"):
        load_gguf(path, cache_dir=False, progress=False)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), "gemma")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="gemma"):
        load_gguf(path, cache_dir=False, progress=False)


def test_linear_rope_scaling_from_metadata(tmp_path):
    def scaling(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, extra=scaling)
    config = load_gguf(path, cache_dir=False, progress=False).config
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_llama3_rope_scaling_from_rope_freqs():
    # Llama 3.2's values; llama.cpp stores only the per-frequency factors.
    dim, theta, factor, low, high, old = 128, 500000.0, 32.0, 1.0, 4.0, 8192
    factors = []
    for freq in theta ** (-np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    got = gguf_loader._llama3_from_factors(np.array(factors, np.float32).astype(np.float64), dim, theta, old)
    assert got == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_sentencepiece_tokenizer():
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "\u2581he", "\u2581hell",
              "\u2581hello", "\u2581w", "or", "\u2581wor", "\u2581worl",
              "\u2581world"]
    tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    # longer pieces must win: give them better scores
    scores[-len(pieces):] = [-100 + len(p) for p in pieces]
    spec = build_tokenizer_spec({
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    })
    assert spec.add_bos_token is True and (spec.bos_token, spec.eos_token) == ("<s>", "</s>")
    tok = Tokenizer.from_str(spec.tokenizer_json)
    idx = {t: i for i, t in enumerate(tokens)}
    ids = tok.encode("hello world</s>").ids
    assert ids == [idx["\u2581hello"], idx["\u2581world"], 2]
    assert tok.decode(ids) == "hello world"
    ids = tok.encode("hé").ids  # é is not in the vocabulary: UTF-8 byte fallback
    assert ids == [idx["\u2581"], idx["h"], idx["<0xC3>"], idx["<0xA9>"]]
    assert tok.decode(ids) == "hé"


# -- conversion cache ---------------------------------------------------------


def _forbid_gguf_reader(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("GGUFReader used on a warm load")

    monkeypatch.setattr(gguf, "GGUFReader", boom)


def test_cache_roundtrip_and_invalidation(tmp_path, monkeypatch):
    path, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    write_tiny_gguf(path, qk_type=Q.Q4_1)
    cold = load_gguf(path, cache_dir=cache, progress=False)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    with monkeypatch.context() as m:
        _forbid_gguf_reader(m)
        warm = load_gguf(path, cache_dir=cache, progress=False)
    assert warm.config == cold.config and warm.tokenizer == cold.tokenizer
    assert warm.tensors.keys() == cold.tensors.keys()
    assert all(torch.equal(warm.tensors[k], cold.tensors[k]) for k in cold.tensors)

    # A corrupt cache is ignored and rewritten.
    files[0].write_bytes(b"not a safetensors file")
    again = load_gguf(path, cache_dir=cache, progress=False)
    assert all(torch.equal(again.tensors[k], cold.tensors[k]) for k in cold.tensors)
    with monkeypatch.context() as m:
        _forbid_gguf_reader(m)
        load_gguf(path, cache_dir=cache, progress=False)

    # A rewritten file gets a new entry, which replaces the old one.
    before = path.stat().st_mtime_ns
    write_tiny_gguf(path, seed=1)
    os.utime(path, ns=(before + 10**9, before + 10**9))  # same size: make sure mtime differs
    changed = load_gguf(path, cache_dir=cache, progress=False)
    assert not torch.equal(changed.tensors["model.norm.weight"], cold.tensors["model.norm.weight"])
    assert len(list(cache.glob("*.safetensors"))) == 1 and list(cache.glob("*")) != files


def test_cache_disabled(tmp_path, monkeypatch):
    path, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    write_tiny_gguf(path)
    load_gguf(path, cache_dir=False, progress=False)
    monkeypatch.setenv("INFERD_NO_CACHE", "1")
    load_gguf(path, cache_dir=cache, progress=False)
    assert not cache.exists() or not any(cache.iterdir())


# -- the real default model against transformers -----------------------------


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    from inferd.models.default_model import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ours(default_gguf, tmp_path_factory):
    return load_gguf(default_gguf, cache_dir=tmp_path_factory.mktemp("gguf-cache"), progress=False)


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


@pytest.fixture(scope="module")
def hf_state_dict(default_gguf):
    transformers = pytest.importorskip("transformers")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            default_gguf.parent, gguf_file=default_gguf.name
        )
        return model.state_dict()
    except (ImportError, ValueError) as exc:
        if "accelerate" not in str(exc):
            raise
    # Without `accelerate` from_pretrained refuses GGUF files; use the loader
    # it would call, with a weightless model for the tensor names.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(default_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]


TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "12345 and 3.14159, 2024-01-01",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "emoji: 😀🚀👍🏽 done",
    "中文测试，你好世界。日本語もあります。",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces   ",
    "Grüße aus Köln — café naïve",
    "<|endoftext|>special<file_sep>tokens",
]


@pytest.mark.parametrize("text", TEXTS)
def test_default_model_tokenizer_matches_transformers(ours, hf_tokenizer, text):
    tok = Tokenizer.from_str(ours.tokenizer.tokenizer_json)
    ids = tok.encode(text).ids
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_default_model_tokenizer_spec(ours, hf_tokenizer):
    spec = ours.tokenizer
    assert (spec.bos_token, spec.eos_token) == (hf_tokenizer.bos_token, hf_tokenizer.eos_token)
    assert spec.pad_token == hf_tokenizer.pad_token
    assert spec.add_bos_token is False and spec.eos_token_ids == [2]
    assert spec.chat_template and "<|im_start|>" in spec.chat_template
    assert ours.config["vocab_size"] == 49152 and ours.config["tie_word_embeddings"] is True


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.17.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.5.self_attn.v_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.layers.3.input_layernorm.weight",
        "model.norm.weight",
    ],
)
def test_default_model_tensors_match_transformers(ours, hf_state_dict, name):
    got, want = ours.tensors[name], hf_state_dict[name].to(torch.float32)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_default_model_all_tensor_names_match_transformers(ours, hf_state_dict):
    assert set(ours.tensors) == {k for k in hf_state_dict if k != "lm_head.weight"}


def test_default_model_cache_is_used(default_gguf, tmp_path, monkeypatch, capsys):
    t0 = time.perf_counter()
    cold = load_gguf(default_gguf, cache_dir=tmp_path, progress=False)
    t1 = time.perf_counter()
    with monkeypatch.context() as m:
        _forbid_gguf_reader(m)
        warm = load_gguf(default_gguf, cache_dir=tmp_path, progress=False)
    t2 = time.perf_counter()
    assert warm.config == cold.config and warm.tokenizer == cold.tokenizer
    assert all(torch.equal(warm.tensors[k], cold.tensors[k]) for k in cold.tensors)
    with capsys.disabled():
        print(f"\ndefault model GGUF load: cold {t1 - t0:.2f} s, warm (cached) {t2 - t1:.2f} s")
