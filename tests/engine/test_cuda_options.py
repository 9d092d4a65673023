"""The CUDA path's engine options, checked without a GPU: the KV budget --gpu-memory-utilization leaves
(free and total memory as the driver would report them), the validation of the graph options, and
the token budget per step each device gets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from inferd.engine.config import EngineConfig
from inferd.engine.core.engine_core import EngineCore

GIB = 1 << 30


def _core(utilization: float):
    core = SimpleNamespace(device=torch.device("cuda"), config=EngineConfig(gpu_memory_utilization=utilization))
    core._activation_reserve = lambda: GIB
    return core


def test_the_kv_cache_gets_what_the_utilization_leaves(monkeypatch):
    # 100 GiB card, 40 GiB in use (the weights, another process): 90 - 40 - 1 GiB of activations
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GIB, 100 * GIB))
    assert EngineCore._kv_budget(_core(0.9)) == int(100 * GIB * 0.9) - 40 * GIB - GIB
    with pytest.raises(ValueError, match="gpu_memory_utilization: 0.4 .* leaves no room"):
        EngineCore._kv_budget(_core(0.4))


def test_activation_reserve_grows_with_the_step():
    mc = SimpleNamespace(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                         vocab_size=49152)
    small = SimpleNamespace(model_config=mc, dtype=torch.bfloat16,
                            config=EngineConfig(max_num_batched_tokens=512, max_num_seqs=8))
    large = SimpleNamespace(model_config=mc, dtype=torch.bfloat16,
                            config=EngineConfig(max_num_batched_tokens=8192, max_num_seqs=256))
    assert EngineCore._activation_reserve(small) > 512 << 20
    assert EngineCore._activation_reserve(large) > EngineCore._activation_reserve(small) + (100 << 20)


def test_graph_options_are_checked():
    assert EngineConfig(cuda_graph_sizes=[8, 1, 200, 4], max_num_seqs=64).cuda_graph_sizes == [1, 4, 8, 64]
    for bad in ([], [0], [2, "4"], [True]):
        with pytest.raises(ValueError, match="cuda_graph_sizes"):
            EngineConfig(cuda_graph_sizes=bad)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_the_token_budget_per_step_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert EngineConfig().max_num_batched_tokens == 512            # CPU: short steps under a burst
    assert EngineConfig(device="cuda").max_num_batched_tokens == 2048
    assert EngineConfig(max_num_batched_tokens=64).max_num_batched_tokens == 64
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert EngineConfig().max_num_batched_tokens == 2048           # auto picks the GPU
    assert EngineConfig(device="cpu").max_num_batched_tokens == 512
    with pytest.raises(ValueError, match="max_num_batched_tokens: must be positive"):
        EngineConfig(max_num_batched_tokens=0)
