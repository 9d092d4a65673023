"""Shared fixtures: tiny reference checkpoints, built once per test session."""

from __future__ import annotations

pytest_plugins = ["tests.store_fixtures"]

import pytest
import torch

from tests.tiny_models import build_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")
