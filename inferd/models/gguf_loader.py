"""Loading a GGUF file (llama.cpp's format) as a `Checkpoint`.

`load_gguf` reads one GGUF file: its metadata becomes an HF-style config and a
tokenizer, its tensors get HF names and are dequantized to float32.

Parsing a GGUF with gguf-py is slow (seconds: it builds a Python object for
every vocabulary entry), so the first load writes a conversion cache: one
.safetensors file holding each tensor's raw (still quantized) bytes already in
HF names and layout, with the config, tokenizer and tensor types in its
metadata. Later loads read that file and only dequantize, never touching the
GGUF parser. The cache is keyed by the file's path, size and mtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from . import gguf_quants
from .checkpoint import Checkpoint, QuantizedTensor, TokenizerSpec
from .gguf_tokenizer import build_tokenizer_spec

log = logging.getLogger(__name__)

# Bump when the cache layout or the conversion changes: old entries then miss.
CACHE_VERSION = 1
_CACHE_FORMAT = "inferd-gguf-cache"

# general.architecture -> (HF class, model_type, q/k rows permuted by llama.cpp)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp adds that HF models compute instead (rope_freqs is read
# for the rope scaling config, then dropped).
_SKIPPED = {"rope_freqs", "attn_rot_embd"}
# Tensors with at least this many stored bytes are dequantized multi-threaded.
_PARALLEL_BYTES = 16 << 20
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclasses.dataclass
class _Raw:
    """One tensor as stored: raw bytes (uint8) or floats, its GGUF type, HF shape."""

    data: torch.Tensor
    ggml_type: str
    shape: list[int]


def load_gguf(
    path: str | os.PathLike,
    *,
    cache_dir: Path | str | Literal[False] | None = None,
    progress: bool = True,
) -> Checkpoint:
    """Load a GGUF file as a Checkpoint with float32 tensors.

    `cache_dir=None` uses the user cache directory, `False` (or env
    INFERD_NO_CACHE=1) disables the conversion cache.
    """
    path = Path(path).resolve()
    stat = path.stat()
    cache_file = _cache_file(path, stat, cache_dir)
    loaded = None
    if cache_file is not None and cache_file.exists():
        try:
            loaded = _read_cache(cache_file)
        except Exception as exc:  # any unreadable cache is just rebuilt
            log.warning("ignoring unreadable GGUF cache %s: %s", cache_file, exc)
    if loaded is None:
        loaded = _convert(path)
        if cache_file is not None:
            _write_cache(cache_file, *loaded)
    config, spec, raws = loaded
    tensors = {}
    threads = torch.get_num_threads()
    try:
        bar = tqdm(raws.items(), desc=f"Loading {path.name}", unit="tensor",
                   disable=None if progress else True)  # None: off when not a terminal
        for name, raw in bar:
            # Dequantizing is memory-bound: extra threads barely help, and on a
            # busy machine their synchronisation made loads 10-50x slower.
            # Only big tensors get the thread pool.
            want = threads if raw.data.nbytes >= _PARALLEL_BYTES else 1
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
            tensors[name] = gguf_quants.dequantize(raw.data, raw.ggml_type, raw.shape)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    quantized = {name: QuantizedTensor(raw.data, raw.ggml_type, raw.shape)
                 for name, raw in raws.items() if raw.data.dtype == torch.uint8}
    return Checkpoint(config=config, tensors=tensors, tokenizer=spec, source=str(path), quantized=quantized)


# -- conversion from the GGUF file ------------------------------------------


def _convert(path: Path) -> tuple[dict[str, Any], TokenizerSpec, dict[str, _Raw]]:
    import gguf  # imported here so a warm (cached) load never needs it

    reader = gguf.GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHITECTURES)})"
        )
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = None
    if "rope_freqs.weight" in by_name:
        rope_freqs = np.array(by_name["rope_freqs.weight"].data, dtype=np.float64).reshape(-1)
    config = _config(meta, arch, by_name, rope_freqs)
    spec = build_tokenizer_spec(meta)
    raws = {}
    for t in reader.tensors:
        hf_name = _hf_name(t.name)
        if hf_name is None:
            continue
        type_name = gguf_quants.type_name(int(t.tensor_type))
        gguf_quants.check_supported(type_name, t.name)
        shape = [int(n) for n in reversed(t.shape.tolist())]
        data = torch.from_numpy(np.array(t.data))  # copy out of the file mapping
        if type_name == "BF16":  # gguf-py hands BF16 over as bytes
            data = data.reshape(-1).view(torch.bfloat16).reshape(shape)
        part = m.group(2) if (m := _LAYER_RE.match(t.name)) else None
        if _ARCHITECTURES[arch][2] and part in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]
            data = _unpermute_rows(data, heads)
        raws[hf_name] = _Raw(data.contiguous(), type_name, shape)
    return config, spec, raws


def _hf_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name, None for tensors HF models do not have."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if base in _SKIPPED or (m and m.group(2) in _SKIPPED):
        return None
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known counterpart in the HF model")


def _unpermute_rows(data: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order for interleaved rope.

    Its converter reorders each head's rows from (2, half) to (half, 2); we
    swap them back so the weights suit HF's rotate_half rope. Rows are whole
    quantization blocks, so this works on the raw bytes too.
    """
    rows = data.shape[0]
    flat = data.reshape(rows, -1)
    out = flat.reshape(n_head, rows // n_head // 2, 2, flat.shape[1]).transpose(1, 2)
    return out.reshape(data.shape)


def _f32(value: float) -> float:
    # GGUF stores these as float32; take the shortest decimal that rounds to
    # it (1e-05, not 9.999999747378752e-06), which is what the model card said.
    return float(str(np.float32(value)))


def _config(
    meta: dict[str, Any], arch: str, tensors: dict[str, Any], rope_freqs: np.ndarray | None
) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    cls, model_type, _ = _ARCHITECTURES[arch]
    hidden = int(get("embedding_length"))
    heads = _uniform(get("attention.head_count"), "attention.head_count")
    kv_heads = _uniform(get("attention.head_count_kv", heads), "attention.head_count_kv")
    head_dim = int(get("attention.key_length") or hidden // heads)
    theta = _f32(get("rope.freq_base", 10000.0))
    embed = tensors.get("token_embd.weight")
    vocab = get("vocab_size")
    if vocab is None:
        vocab = int(embed.shape[1]) if embed is not None else len(meta["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(get, rope_freqs, int(get("rope.dimension_count") or head_dim), theta),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
        # Qwen2 always has q/k/v biases; reading the tensors covers that and
        # the odd Llama fine-tune that adds them.
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    if get("attention.sliding_window") is not None:
        config["sliding_window"] = int(get("attention.sliding_window"))
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    return config


def _uniform(value: Any, key: str) -> int:
    # Some files give a per-layer list; we only run models where all agree.
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF {key} differs between layers ({value}); not supported")
        value = value[0]
    return int(value)


def _rope_scaling(get, rope_freqs: np.ndarray | None, rot_dim: int, theta: float) -> dict | None:
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    orig = get("rope.scaling.original_context_length")
    if kind is None and get("rope.scale_linear") is not None:  # older files
        kind, factor = "linear", get("rope.scale_linear")
    if kind in ("linear", "yarn", "llama3") and factor is not None:
        out: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor)}
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        extra = {"low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attn_factor"}
        for key in sorted(extra):
            value = get(f"rope.scaling.{key}") or get(f"rope.scaling.yarn_{key}")
            if value is not None:
                out[key] = _f32(value)
        return out
    if rope_freqs is not None:
        return _llama3_from_factors(rope_freqs, rot_dim, theta, int(orig or 8192))
    return None


def _llama3_from_factors(factors: np.ndarray, rot_dim: int, theta: float, orig: int) -> dict | None:
    """Recover Llama 3 rope scaling from the per-frequency factors llama.cpp
    stores as `rope_freqs` (it writes no metadata for this kind of scaling).

    Only old_ctx/high and old_ctx/low matter to the formula, so we fix
    original_max_position_embeddings and fit the two frequency factors.
    """
    freqs = theta ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)
    factor = float(factors.max())
    if len(freqs) != len(factors) or factor <= 1.0:
        return None
    x = orig * freqs / (2 * math.pi)  # = orig / wavelength
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 1 = unscaled, 0 = fully scaled
    mid = (s > 1e-4) & (s < 1 - 1e-4)
    if mid.sum() >= 2:
        slope, icpt = np.polyfit(x[mid], s[mid], 1)
        low = -icpt / slope
        high = low + 1 / slope
    else:
        low, high = 1.0, 4.0  # Meta's values; any cut in the gap gives the same factors
    low, high = round(float(low), 4), round(float(high), 4)
    want = np.where(x > high, 1.0, np.where(x < low, factor, 0.0))
    sm = (x - low) / (high - low)
    middle = (x >= low) & (x <= high)
    want[middle] = 1 / ((1 - sm[middle]) / factor + sm[middle])
    if not np.allclose(want, factors, rtol=1e-3, atol=1e-3):
        warnings.warn("GGUF rope_freqs do not follow Llama 3 scaling; using the closest fit")
    return {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


# -- conversion cache ---------------------------------------------------------


def _cache_file(path: Path, stat: os.stat_result, cache_dir) -> Path | None:
    if cache_dir is False or os.environ.get("INFERD_NO_CACHE", "") not in ("", "0"):
        return None
    if cache_dir is None:
        import platformdirs

        cache_dir = Path(platformdirs.user_cache_dir("inferd")) / "gguf"
    where = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    what = hashlib.sha256(f"{CACHE_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    # The path hash comes first so that a rewritten file's old entry can be found and removed.
    return Path(cache_dir) / f"{where}-{what}.safetensors"


def _write_cache(cache_file: Path, config: dict, spec: TokenizerSpec, raws: dict[str, _Raw]) -> None:
    from safetensors.torch import save_file

    metadata = {
        "format": _CACHE_FORMAT,
        "version": str(CACHE_VERSION),
        "config": json.dumps(config),
        "tokenizer": json.dumps(dataclasses.asdict(spec)),
        "tensors": json.dumps({n: {"type": r.ggml_type, "shape": r.shape} for n, r in raws.items()}),
    }
    tmp = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name, suffix=".tmp")
        os.close(fd)
        save_file({n: r.data for n, r in raws.items()}, tmp, metadata=metadata)
        os.replace(tmp, cache_file)  # readers see the old file or the whole new one
        tmp = None
        prefix = cache_file.name.split("-")[0]
        for old in cache_file.parent.glob(f"{prefix}-*.safetensors"):
            if old != cache_file:
                old.unlink(missing_ok=True)
    except OSError as exc:  # a cache we cannot write only costs speed
        log.warning("could not write GGUF cache %s: %s", cache_file, exc)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _read_cache(cache_file: Path) -> tuple[dict, TokenizerSpec, dict[str, _Raw]]:
    from safetensors import safe_open

    with safe_open(str(cache_file), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _CACHE_FORMAT or meta.get("version") != str(CACHE_VERSION):
            raise ValueError("not an inferd GGUF cache of this version")
        info = json.loads(meta["tensors"])
        raws = {n: _Raw(f.get_tensor(n), i["type"], i["shape"]) for n, i in info.items()}
    return json.loads(meta["config"]), TokenizerSpec(**json.loads(meta["tokenizer"])), raws
