"""Engine options: one validated object, shared by the Python API and the CLI.

`DeviceOptions` is the part the embedder's options (`EmbedConfig`,
engine/embedding/spec.py) share with `EngineConfig`: how `dtype`, `device` and
`num_threads` are checked and resolved. Only the dtype `auto` picks differs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from inferd.engine.spec_decode.config import SpeculativeConfig
from inferd.layers.cpu_isa import has_native_bf16
from inferd.layers.kv_storage import KV_CACHE_DTYPES

QUANTIZATIONS = ("auto", "none", "gguf", "gguf-q8", "int8", "int4")
# the GGUF-block modes and the int8 terms each splits an activation into (layers/quant_blocks.py)
GGUF_TERMS = {"gguf": 2, "gguf-q8": 1}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(value: int | str, name: str = "kv_cache_bytes") -> int:
    """'512MiB', '2GB', 1073741824 -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{name}: cannot read {value!r} as a size (e.g. 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class DeviceOptions:
    """Checking and resolving `dtype`, `device` and `num_threads` for a config dataclass.

    A mixin rather than a base dataclass, so each config declares these fields
    itself, in the order its callers pass them. Each config supplies
    `_auto_dtype`, the one rule that differs between them."""

    dtype: str
    device: str
    num_threads: int | None

    def _check_device_options(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype: {self.dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} is not one of auto, cpu, cuda")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was asked for but no CUDA device is available")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        return _DTYPES[self.dtype] if self.dtype != "auto" else self._auto_dtype(device)

    def _auto_dtype(self, device: torch.device) -> torch.dtype:
        raise NotImplementedError

    def threads(self) -> int:
        return self.num_threads or int(os.environ.get("INFERD_NUM_THREADS", 0)) or os.cpu_count() or 1


@dataclass
class EngineConfig(DeviceOptions):
    model: str | None = None
    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16
    device: str = "auto"                # auto | cpu | cuda
    kv_cache_bytes: int | str = "1GiB"  # KV budget on CPU
    # CUDA: the fraction of the GPU's memory this engine may hold (weights, activations, KV cache: the KV
    # cache gets what is left of it), vLLM's name and meaning
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False         # CUDA: no CUDA graphs for decode steps (engine/core/cuda_graphs.py)
    cuda_graph_sizes: list[int] | None = None  # decode batch sizes captured; None: 1, 2, 4, 8, 16, ... max_num_seqs
    block_size: int = 16
    max_num_seqs: int = 64
    # tokens per step; None: 512 on the CPU, 2048 on a GPU. On the CPU a step's time grows with its
    # tokens (the matmuls are compute-bound from ~16 rows), so a burst of prompts prefilled 512 tokens a
    # step gives the median request its first token about twice as soon at the same throughput
    # (docs/benchmarks.md, "Online serving")
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    num_threads: int | None = None
    enable_prefix_caching: bool = True
    # auto (None): a quantized GGUF file computes with its own blocks on the CPU (gguf), other models in
    # floats; gguf-q8: the same with one int8 term per activation (llama.cpp's Q8 activations: faster,
    # less accurate); none: floats always; int8 | int4: float weights plus copies for small batches
    quantization: str | None = None
    kv_cache_dtype: str = "auto"        # auto (the model's dtype) | int8 | fp8 (per-row scales: layers/kv_storage)
    reasoning_parser: str | None = None  # think (deepseek_r1, qwen3) | none; None: from the chat template
    chat_template: str | None = None     # a Jinja chat template (or a file of one) instead of the model's
    grammar_timeout_s: float = 10.0      # the longest a request's grammar may take to compile at the edge
    # speculative decoding (engine/spec_decode/): a SpeculativeConfig, or its fields as a dict or JSON text
    # ({"method": "ngram", "num_speculative_tokens": 4}); None: off
    speculative_config: SpeculativeConfig | dict | str | None = None
    # vision-language models (docs/vision.md): decoded images (API side) and encoder outputs (core) are each
    # kept up to this many bytes; images are fetched from http(s) URLs only on these hosts (none: data: URLs
    # only), within the limits below
    vision_cache_bytes: int | str = "256MiB"
    allowed_media_domains: list[str] | None = None
    max_image_bytes: int | str = "20MB"
    max_image_pixels: int = 32_000_000
    media_fetch_timeout_s: float = 10.0
    progress: bool = True

    def __post_init__(self):
        self.kv_cache_bytes = parse_size(self.kv_cache_bytes)
        self.vision_cache_bytes = parse_size(self.vision_cache_bytes, "vision_cache_bytes")
        self.max_image_bytes = parse_size(self.max_image_bytes, "max_image_bytes")
        self.allowed_media_domains = [d.strip().lower() for d in self.allowed_media_domains or () if d.strip()]
        for name in ("max_image_pixels", "media_fetch_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        self._check_device_options()
        if self.max_num_batched_tokens is None:
            # an asked-for cuda counts even where it is missing (the engine refuses it when it starts)
            on_gpu = self.device == "cuda" or self.torch_device().type == "cuda"
            self.max_num_batched_tokens = 2048 if on_gpu else 512
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        self.quantization = self.quantization or "auto"
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cuda_graph_sizes is not None:
            sizes = self.cuda_graph_sizes
            if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
                raise ValueError(f"cuda_graph_sizes: must be a list of positive integers, got {sizes!r}")
            self.cuda_graph_sizes = sorted({min(n, self.max_num_seqs) for n in sizes})

    def resolve_quantization(self, has_blocks: bool, device: torch.device, kernels: bool) -> str | None:
        """What the engine computes with: "gguf"/"gguf-q8" (the file's quantized blocks with two or one
        int8 activation terms, layers/quant_blocks.py),
        "int8"/"int4" (float weights with copies for few rows) or None (float weights).
        `has_blocks`: the checkpoint has packable GGUF blocks; `kernels`: the CPU kernels built."""
        spec = self.speculative_config
        self_draft = spec is not None and spec.method == "draft_model" and spec.model is None
        if self.quantization == "auto":
            # an explicit --dtype asks for floats; a self-draft is made from the float weights
            native = has_blocks and device.type == "cpu" and kernels and self.dtype == "auto" and not self_draft
            return "gguf" if native else None
        if self.quantization in GGUF_TERMS:
            why = ("the model has no Q4_0, Q4_1 or Q8_0 GGUF weights" if not has_blocks
                   else "it runs on the CPU" if device.type != "cpu"
                   else "the CPU kernels are off (INFERD_CPU_KERNELS=0) or did not build (see the log)" if not kernels
                   else "a draft model made from the target's weights needs them in floats" if self_draft
                   else None)
            if why:
                raise ValueError(f"quantization: {self.quantization} cannot be used: {why}")
            return self.quantization
        return None if self.quantization == "none" else self.quantization

    def model_dtype(self, device: torch.device, quantization: str | None) -> torch.dtype:
        """The activations' dtype: float32 under gguf unless --dtype says otherwise (the kernel
        quantizes the activations itself, and fp32 elsewhere costs little on a quantized model)."""
        if quantization in GGUF_TERMS and self.dtype == "auto":
            return torch.float32
        return self.torch_dtype(device)

    def _auto_dtype(self, device: torch.device) -> torch.dtype:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if has_native_bf16() else torch.float32
