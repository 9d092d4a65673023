"""Fused CPU kernels (inferd/csrc/), compiled on first use and cached.

A decode step with few rows spends more time calling eager torch ops than
computing: every layer used to run ~40 of them. The kernels fold RMSNorm with the
residual add, SiLU-and-multiply, rotary embedding, the KV-cache write and the
decode attention (which reads the paged cache in place) into one call each, with
the same arithmetic as the torch code they replace.

They are built with the system C++ compiler through `torch.utils.cpp_extension`
(about 30 s, once per machine: the result is cached under the user cache dir,
keyed by Python and torch versions, source and CPU). The sources are compiled
from a copy inside that cache directory, not from the package: torch's builder
writes their paths into its ninja file, so two installs of the same code (two
checkouts, two venvs) compiling from their own paths rebuilt each other's
kernels on every start. `ops_for(tensor)` returns the compiled
module for CPU tensors, or None when the kernels are off: `INFERD_CPU_KERNELS=0`,
`disabled()` (tests compare both paths), or a failed build (no compiler), after
which the torch code runs and a warning says why. The kernel tests fail instead of
skipping when `INFERD_REQUIRE_CPU_KERNELS=1` (CI sets it), so a broken build
cannot go unnoticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from inferd.layers.cpu_isa import cpu_flags, kernel_march

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = [CSRC / "cpu_ops.cpp", CSRC / "decode_layers.cpp", CSRC / "quant_matmul.cpp"]
# -ffp-contract=off: no fused multiply-adds across the operations the torch code
# rounds separately, so rope and the norms give the same bits in fp32 as well
# the -march follows the CPU, or ATEN_CPU_CAPABILITY where that asks for less (cpu_isa)
CFLAGS = ["-O3", kernel_march(), "-fopenmp", "-ffp-contract=off"]

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_enabled = os.environ.get("INFERD_CPU_KERNELS", "1") != "0"


def _source_files() -> list[Path]:
    return [p for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")]


def _build_dir() -> tuple[str, Path]:
    from platformdirs import user_cache_dir

    cpu = " ".join(sorted(cpu_flags()))
    texts = [p.read_text() for p in _source_files()]
    key = hashlib.sha256("\0".join([sys.version, torch.__version__, *texts, " ".join(CFLAGS), cpu])
                         .encode()).hexdigest()[:16]
    name = f"inferd_cpu_ops_{key}"
    return name, Path(user_cache_dir("inferd")) / "kernels" / name


def build_sources(directory: Path) -> list[str]:
    """The sources to compile: copies in `directory/src`, the same paths for every install of this code."""
    src = directory / "src"
    src.mkdir(parents=True, exist_ok=True)
    for p in _source_files():
        copy = src / p.name
        text = p.read_bytes()
        if not copy.exists() or copy.read_bytes() != text:
            tmp = copy.with_suffix(copy.suffix + f".{os.getpid()}.tmp")
            tmp.write_bytes(text)
            tmp.replace(copy)  # atomic: a concurrent build never reads half a file
    return [str(src / p.name) for p in SOURCES]


def load() -> ModuleType | None:
    """The compiled module, building it if needed; None if it cannot be built."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        name, directory = _build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        built = any(directory.glob(f"{name}*.so"))
        t0 = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load as build

            if not built:
                log.info("compiling the CPU kernels (once per machine, about 30 s)")
            _module = build(name=name, sources=build_sources(directory), extra_cflags=CFLAGS,
                            extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
        except Exception as e:  # no compiler, no headers: the torch path still works
            log.warning("CPU kernels unavailable, using eager torch ops (slower): %s", e)
            return None
        if not built:
            log.info("CPU kernels compiled in %.1fs", time.perf_counter() - t0)
        return _module


def available() -> bool:
    """The kernels are on (INFERD_CPU_KERNELS is not 0) and built."""
    return _enabled and load() is not None


def ops_for(x: torch.Tensor) -> ModuleType | None:
    """The kernels, if they apply to this tensor (on the CPU) and are on."""
    if not _enabled or x.device.type != "cpu":
        return None
    return _module if _tried else load()


@contextlib.contextmanager
def disabled():
    """Run the eager torch path inside this block (for comparisons)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
