"""The dynamic batcher on real ONNX Runtime sessions: concurrent requests share runs, each gets its rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferd.classic.batcher import DynamicBatcher
from inferd.classic.session import OnnxModel


async def _submit_all(batcher: DynamicBatcher, feeds: list[dict], rows: list[int]):
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(f, r) for f, r in zip(feeds, rows)), return_exceptions=True)
    finally:
        await batcher.aclose()


def test_concurrent_requests_run_together_and_get_their_own_rows(model_dir):
    model = OnnxModel.load(model_dir / "affine.onnx")
    records = []
    batcher = DynamicBatcher(model.run, max_batch_size=16, max_queue_delay_s=0.005, on_batch=records.append)
    rng = np.random.default_rng(0)
    rows = [1, 2, 1, 3, 1, 1, 4, 1, 2, 1, 1, 1]
    feeds = [{"a": rng.normal(size=(n, 4)).astype(np.float32), "b": rng.normal(size=(n, 2)).astype(np.float32)}
             for n in rows]
    results = asyncio.run(_submit_all(batcher, feeds, rows))
    for f, out in zip(feeds, results):
        np.testing.assert_allclose(out["y"], model.run(f)["y"], rtol=1e-6)
        assert out["n"].shape == (len(f["a"]),)
    assert sum(r.rows for r in records) == sum(rows) and sum(r.requests for r in records) == len(rows)
    assert len(records) < len(rows) and max(r.rows for r in records) <= 16  # batched, within the limit
    assert all(q >= 0 for r in records for q in r.queue_s)


def test_max_batch_size_zero_runs_each_request_alone(model_dir):
    model = OnnxModel.load(model_dir / "affine.onnx")
    records = []
    batcher = DynamicBatcher(model.run, max_batch_size=0, on_batch=records.append)
    feeds = [{"a": np.ones((1, 4), np.float32), "b": np.ones((1, 2), np.float32)}] * 5
    asyncio.run(_submit_all(batcher, feeds, [1] * 5))
    assert [r.rows for r in records] == [1] * 5


def test_a_failing_request_fails_alone(model_dir):
    """The recommender's Gather refuses an unknown user id: only that request fails, its batch-mates are answered."""
    model = OnnxModel.load(model_dir / "rec.onnx")
    users, items = np.load(model_dir / "users.npy"), np.load(model_dir / "items.npy")
    batcher = DynamicBatcher(model.run, max_batch_size=8, max_queue_delay_s=0.005)
    ids = [3, 999, 7]
    results = asyncio.run(_submit_all(batcher, [{"user_id": np.array([i])} for i in ids], [1, 1, 1]))
    assert isinstance(results[1], Exception) and "indices" in str(results[1])
    for i, out in zip((3, 7), (results[0], results[2])):
        expected = np.argsort(-(items @ users[i]))[:5]
        assert out["items"][0].tolist() == expected.tolist()


def test_closed_batcher_refuses_work(model_dir):
    model = OnnxModel.load(model_dir / "affine.onnx")

    async def go():
        batcher = DynamicBatcher(model.run, max_batch_size=4)
        batcher.start()
        await batcher.aclose()
        with pytest.raises(RuntimeError, match="shutting down"):
            await batcher.submit({"a": np.ones((1, 4), np.float32), "b": np.ones((1, 2), np.float32)}, 1)

    asyncio.run(go())


def test_a_bug_outside_onnx_runtime_fails_its_batch_and_the_loop_goes_on(model_dir):
    """Outputs that cannot be split by rows (a broken run function) fail that batch; later requests are served."""
    model = OnnxModel.load(model_dir / "affine.onnx")
    calls = []

    def run(feeds):
        calls.append(len(feeds["a"]))
        return None if len(calls) == 1 else model.run(feeds)  # the first run returns garbage

    async def go():
        batcher = DynamicBatcher(run, max_batch_size=4)
        batcher.start()
        one = {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 2), np.float32)}
        first = await asyncio.wait_for(asyncio.gather(batcher.submit(one, 1), batcher.submit(one, 1),
                                                      return_exceptions=True), 10)
        assert calls == [2] and all(isinstance(e, AttributeError) for e in first)
        assert batcher.running
        out = await asyncio.wait_for(batcher.submit(one, 1), 10)  # a dead loop would never answer
        await batcher.aclose()
        assert not batcher.running
        return out

    np.testing.assert_allclose(asyncio.run(go())["y"], model.run({"a": np.ones((1, 4), np.float32),
                                                                   "b": np.ones((1, 2), np.float32)})["y"])
