"""The compiled CPU kernels, for the tests that exercise them."""

from __future__ import annotations

import os

import pytest

from inferd.layers import cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    """The kernel module; skipped where it cannot be built (no C++ compiler), a failure when
    INFERD_REQUIRE_CPU_KERNELS=1 (CI sets it), so a broken build cannot go unnoticed."""
    ops = cpu_kernels.load()
    if ops is None:
        if os.environ.get("INFERD_REQUIRE_CPU_KERNELS") == "1":
            pytest.fail("the CPU kernels did not build")
        pytest.skip("the CPU kernels cannot be built here")
    return ops
