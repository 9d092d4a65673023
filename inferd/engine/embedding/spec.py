"""What an embedding model directory says, and the options an embedder runs with.

`EmbedConfig` holds the run options (one validated object, as `EngineConfig` is
for generation; both check and resolve device, dtype and threads through
`DeviceOptions`). `EmbedSpec` is what a model directory declares: tokenizer,
maximum length, output size, pooling, normalization and the output sizes it
allows. It is read once by `load_spec` and travels as it is from the embedding
process to the API process, so both sides apply the same rules; `SpecFacts`
gives both embedders (`Embedder`, `AsyncEmbedder`) the same view of it.

The sentence-transformers files, when present, decide the recipe, as
`SentenceTransformer` would: `modules.json` lists the modules (Transformer,
Pooling, Normalize; any other module, such as Dense, is refused rather than
silently skipped), `1_Pooling/config.json` picks the pooling,
`sentence_bert_config.json` sets `max_seq_length` and `do_lower_case`. Without
them: mean pooling, no normalization, the length limit of the position table.

Matryoshka models may return shorter vectors (`dimensions`): a model declares it
with `matryoshka_dimensions` (a list of sizes) or `is_matryoshka: true` (any size)
in config.json or config_sentence_transformers.json. The vector is cut and, when
the model normalizes, normalized again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferd.engine.config import DeviceOptions
from inferd.engine.sampling_params import InvalidParameterError
from inferd.models.default_embedding_model import is_default_embedding

POOLING_MODES = ("mean", "cls", "lasttoken", "max", "mean_sqrt_len_tokens")
# legacy boolean keys of sentence-transformers' Pooling config -> mode
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM")


@dataclass
class EmbedConfig(DeviceOptions):
    model: str | None = None            # a model directory, or None / "default-embedding"
    dtype: str = "float32"              # float32 | bfloat16 | float16 | auto (fp32 on CPU, bf16 on CUDA)
    device: str = "auto"                # auto | cpu | cuda
    num_threads: int | None = None      # torch threads (default: INFERD_NUM_THREADS or all cores)
    max_batch_tokens: int = 8192        # padded tokens per forward pass; also the dynamic batch's goal
    max_wait_ms: float = 2.0            # how long a dynamic batch waits for more requests
    max_pending_requests: int = 1024    # requests in flight in the server before it refuses more
    progress: bool = False              # a progress bar while loading weights

    def __post_init__(self):
        self._check_device_options()
        for name in ("max_batch_tokens", "max_pending_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms: must not be negative, got {self.max_wait_ms}")

    def _auto_dtype(self, device: torch.device) -> torch.dtype:
        # embeddings are compared by cosine similarity: keep full precision on CPU
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


@dataclass
class EmbedSpec:
    """How to turn inputs into vectors for one model (no weights)."""

    model_name: str
    source: str                   # directory holding config.json and the weights
    tokenizer_json: str
    vocab_size: int
    max_len: int                  # tokens per input, special tokens included
    dimension: int                # native output size
    pooling: str                  # one of POOLING_MODES
    normalize: bool               # L2-normalize the pooled vector
    do_lower_case: bool = False
    is_matryoshka: bool = False
    matryoshka_dimensions: list[int] = field(default_factory=list)  # empty: any size up to `dimension`

    def check_dimensions(self, dimensions: int | None) -> None:
        """Raise InvalidParameterError unless the model can return `dimensions`-sized vectors."""
        if dimensions is None or (type(dimensions) is int and dimensions == self.dimension):
            return
        if type(dimensions) is int and self.is_matryoshka and (
                dimensions in self.matryoshka_dimensions
                or (not self.matryoshka_dimensions and 1 <= dimensions <= self.dimension)):
            return
        if not self.is_matryoshka:
            allowed = f"only {self.dimension} (it is not a Matryoshka model)"
        elif self.matryoshka_dimensions:
            allowed = "one of " + ", ".join(map(str, sorted({*self.matryoshka_dimensions, self.dimension})))
        else:
            allowed = f"from 1 to {self.dimension}"
        raise InvalidParameterError(
            "dimensions", f"{self.model_name} cannot return {dimensions!r}-dimensional embeddings; allowed: {allowed}")

    def apply_dimensions(self, vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
        """Cut vectors to a checked `dimensions` (normalizing again when the model normalizes)."""
        if dimensions is None or dimensions == self.dimension:
            return vectors
        cut = vectors[:, :dimensions]
        if self.normalize:
            cut = cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(cut, dtype=np.float32)


class SpecFacts:
    """`model_name`, `dimension` and `max_len` of an embedder that holds its model's `spec`."""

    spec: EmbedSpec | None

    @property
    def model_name(self) -> str:
        return self.spec.model_name

    @property
    def dimension(self) -> int:
        return self.spec.dimension

    @property
    def max_len(self) -> int:
        return self.spec.max_len


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def is_encoder_config(config: dict[str, Any]) -> bool:
    return (config.get("model_type") == "bert"
            or any(a in ENCODER_ARCHITECTURES for a in config.get("architectures") or []))


def is_embedding_model(model: str | os.PathLike | None) -> bool:
    """Whether a model argument names an embedding (BERT-family encoder) model.

    `None` is not one here: it is the generation side's default model."""
    if model is None:
        return False
    if is_default_embedding(model):
        return True
    path = Path(model).expanduser()
    if not path.is_dir():
        return False
    config = _read_json(encoder_dir(path) / "config.json")
    return isinstance(config, dict) and is_encoder_config(config)


def _transformer_dir(path: Path, modules: list[dict] | None) -> Path:
    """Where the encoder's own files are: the model directory, or the Transformer
    module's subdirectory (older sentence-transformers layouts use 0_Transformer/)."""
    for m in modules or []:
        if _module_kind(m) == "Transformer":
            return path / m.get("path", "")
    return path


def _module_kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _pooling_mode(config: dict[str, Any]) -> str:
    mode = config.get("pooling_mode")
    if mode is None:  # legacy: one boolean per mode
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"pooling {modes} is not supported (one of {', '.join(POOLING_MODES)})")
    return modes[0]


def load_spec(path: Path, model_name: str, config: dict[str, Any], tokenizer_json: str) -> EmbedSpec:
    """The spec of the model directory `path`, given its encoder's config and tokenizer."""
    modules = _read_json(path / "modules.json")
    encoder_dir = _transformer_dir(path, modules)
    pooling, normalize = "mean", False
    for m in modules or []:
        kind = _module_kind(m)
        if kind == "Pooling":
            pooling = _pooling_mode(_read_json(path / m.get("path", "") / "config.json") or {})
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise ValueError(f"model {model_name}: sentence-transformers module {m.get('type')!r} "
                             "is not supported (only Transformer, Pooling and Normalize)")
    st_config = _read_json(encoder_dir / "sentence_bert_config.json") or {}
    max_positions = config.get("max_position_embeddings", 512)
    max_len = min(st_config.get("max_seq_length") or max_positions, max_positions)
    st_meta = _read_json(path / "config_sentence_transformers.json") or {}
    dims = config.get("matryoshka_dimensions") or st_meta.get("matryoshka_dimensions") or []
    return EmbedSpec(
        model_name=model_name, source=str(encoder_dir), tokenizer_json=tokenizer_json,
        vocab_size=config["vocab_size"], max_len=max_len, dimension=config["hidden_size"],
        pooling=pooling, normalize=normalize, do_lower_case=bool(st_config.get("do_lower_case")),
        is_matryoshka=bool(dims or config.get("is_matryoshka") or st_meta.get("is_matryoshka")),
        matryoshka_dimensions=[int(d) for d in dims],
    )


def encoder_dir(path: Path) -> Path:
    """The directory holding the encoder's config.json, weights and tokenizer."""
    return _transformer_dir(path, _read_json(path / "modules.json"))
