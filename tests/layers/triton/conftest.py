"""The Triton kernels' tests: on a machine without a GPU they run in Triton's interpreter
(TRITON_INTERPRET=1, set in tests/conftest.py before any kernel is defined); without
Triton installed they are skipped, and fail instead when INFERD_REQUIRE_TRITON=1 (CI
sets it), so a missing install cannot pass unnoticed."""

from __future__ import annotations

import os

import pytest
import torch

from inferd.layers import triton_ops


@pytest.fixture(scope="session")
def device():
    if not triton_ops.installed():
        if os.environ.get("INFERD_REQUIRE_TRITON") == "1":
            pytest.fail("triton is not installed")
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    assert triton_ops.interpreted(), "without a GPU the kernels run only in Triton's interpreter"
    return torch.device("cpu")


@pytest.fixture(scope="session")
def kernels(device):
    return triton_ops.kernels()
