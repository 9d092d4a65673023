"""The CUDA path's attention backend and decode graphs, run on the CPU: the Triton kernels in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), the graphs with the capture
replaced by a direct call over the same persistent buffers.

The engine with them must give the torch backend's greedy tokens: prompts cut into chunks, prefix
cache hits, decode batches padded to their bucket, and steps too large for any bucket.
"""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.engine.core import cuda_graphs
from inferd.layers import triton_ops
from inferd.layers.triton_attention import TritonAttentionBackend
from tests.engine.test_reference import PROMPTS

pytestmark = pytest.mark.usefixtures("triton_interpreter")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def triton_interpreter():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        assert torch.os.environ.get("TRITON_INTERPRET") == "1"


def _prompts(llm):
    # a shared prefix (prefix-cache hits) and lengths that need several 16-token chunks
    base = [llm.tokenizer.encode((PROMPTS[i % len(PROMPTS)] + " ") * (1 + i % 3)) for i in range(5)]
    return base + [base[2] + base[0][:3]]


def _engine(model, **options) -> LLM:
    return LLM(str(model), dtype="float32", progress=False, max_num_batched_tokens=16, **options)


def _reference_tokens(model, prompts_of, monkeypatch, **options) -> tuple[list, list]:
    """Prompts and greedy tokens of the torch path (on a GPU too: the Triton kernels off)."""
    with monkeypatch.context() as m:
        m.setattr(triton_ops, "_enabled", False)
        ref = _engine(model, **options)
        prompts = prompts_of(ref)
        return prompts, [o.outputs[0].token_ids for o in ref.generate(prompts, GREEDY)]


class CountingCapture:
    """direct_capture that counts replays by bucket (the rows of the output)."""

    def __init__(self):
        self.replays: dict[int, int] = {}

    def __call__(self, forward):
        def replay():
            out = forward()
            self.replays[out.shape[0]] = self.replays.get(out.shape[0], 0) + 1
            return out
        return replay


def _use_triton(llm: LLM, graph_sizes: list[int] | None = None, capture=None):
    core = llm.engine.core
    mc = core.model_config
    core.runner.backend = TritonAttentionBackend(mc.num_heads, mc.num_kv_heads)
    if graph_sizes is not None:
        core.config.cuda_graph_sizes = graph_sizes
        core.runner.graphs = core._capture_graphs(capture or cuda_graphs.direct_capture)
    return llm


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_triton_backend_gives_the_torch_backends_tokens(tiny_llama, kv_cache_dtype, monkeypatch):
    prompts, expected = _reference_tokens(tiny_llama, _prompts, monkeypatch, kv_cache_dtype=kv_cache_dtype)
    llm = _use_triton(_engine(tiny_llama, kv_cache_dtype=kv_cache_dtype))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == expected
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def test_decode_graphs_replay_the_eager_tokens(tiny_llama, monkeypatch):
    prompts, expected = _reference_tokens(tiny_llama, _prompts, monkeypatch)
    capture = CountingCapture()
    # buckets 1, 2, 4: six requests decode eagerly (over the largest), then fewer replay padded graphs
    llm = _use_triton(_engine(tiny_llama, max_num_seqs=6), graph_sizes=[1, 2, 4], capture=capture)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == expected
    one_by_one = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts[:2]]
    assert one_by_one == expected[:2]
    assert capture.replays[1] >= 2 * (GREEDY.max_tokens - 1)   # every decode of a request alone
    assert llm.engine.core.runner.graphs.buckets == [1, 2, 4]


def test_graph_buffers_pad_the_rows_past_the_step(tiny_llama):
    llm = _use_triton(_engine(tiny_llama), graph_sizes=[4, 8])
    core = llm.engine.core
    graphs = core.runner.graphs
    assert graphs.bucket_for(1) == 4 and graphs.bucket_for(5) == 8 and graphs.bucket_for(9) is None
    bs = core.config.block_size
    # three rows decoding at positions 3, 20 and 40 of their own blocks
    tables = [[5], [1, 2], [7, 3, 4]]
    positions = [3, 20, 40]
    slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
    seq_lens = [p + 1 for p in positions]
    graphs.slots.fill_(123)                      # stale values from an earlier, larger step
    graphs.seq_lens.fill_(99)
    hidden = graphs.run([10, 11, 12], positions, slots, seq_lens, tables)
    assert hidden.shape == (3, core.model_config.hidden_size)
    assert graphs.ids[:4].tolist() == [10, 11, 12, 0]
    assert graphs.slots[:4].tolist() == slots + [cuda_graphs.PAD_SLOT]
    assert graphs.seq_lens[:4].tolist() == seq_lens + [1]
    assert graphs.block_tables[:4, :3].tolist() == [[5, 0, 0], [1, 2, 0], [7, 3, 4], [0, 0, 0]]
    assert graphs.slots[4:].tolist() == [123] * 4   # rows of the larger bucket are not this step's
    assert graphs.run(list(range(9)), [0] * 9, [0] * 9, [1] * 9, [[0]] * 9) is None  # over the largest bucket


def test_default_buckets_end_at_max_num_seqs():
    assert cuda_graphs.default_buckets(64)[:5] == [1, 2, 4, 8, 16] and cuda_graphs.default_buckets(64)[-1] == 64
    assert cuda_graphs.default_buckets(3) == [1, 2, 3]
    assert cuda_graphs.default_buckets(256)[-3:] == [192, 224, 256]
