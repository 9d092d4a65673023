"""Shared fixtures: tiny reference checkpoints, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Triton's kernels (inferd/layers/triton_ops) run in its interpreter where there is no GPU; it reads
# this when a kernel is defined, so it is set before any test imports one
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import build_noisy_copy, build_tiny_model

pytest_plugins = ["tests.store_fixtures"]



torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_draft(tiny_llama, tmp_path_factory):
    """A draft model for the tiny Llama: its weights with noise, so that about half the drafts are kept."""
    return build_noisy_copy(tmp_path_factory.mktemp("tiny-llama-draft"), tiny_llama, noise=0.005)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_llama_slow(tmp_path_factory):
    """Wider and deeper than the tiny Llama, 4096-token context: a step costs ~2 ms even on
    the fused CPU kernels, so a 4000-token generation outlives what the tests do meanwhile
    (drains, disconnects, overload) by seconds. Serve it with SLOW_KV (tests/api/conftest.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-slow"), "llama", max_position_embeddings=4096,
                            hidden_size=256, intermediate_size=1024, num_hidden_layers=8)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    from tests.tiny_vlm import build_tiny_vlm
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))
