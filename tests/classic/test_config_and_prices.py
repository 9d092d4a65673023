"""Tensor models in the gateway config, and their price per 1,000 predictions in the price book."""

from __future__ import annotations

import asyncio

import pytest

from inferd.gateway.config import OnnxSpec, parse_config
from inferd.tenancy.metering import Metering
from inferd.tenancy.prices import Price, PriceBook


def onnx_config(**deployment) -> dict:
    return {"models": [{"name": "fraud", "deployments": [{"provider": "onnx", "model": "fraud.onnx", **deployment}]}]}


def test_onnx_deployments_take_tritons_batcher_options():
    config = parse_config(onnx_config(max_batch_size=32, max_queue_delay_microseconds=500, intra_op_num_threads=2,
                                      version="7", price={"per_1k_predictions": 0.02}))
    spec = config.models[0].deployments[0]
    assert isinstance(spec, OnnxSpec) and spec.name == "fraud/0"
    assert (spec.max_batch_size, spec.max_queue_delay_microseconds, spec.intra_op_num_threads, spec.version) == \
        (32, 500, 2, "7")
    defaults = parse_config(onnx_config()).models[0].deployments[0]
    assert (defaults.max_batch_size, defaults.max_queue_delay_microseconds, defaults.intra_op_num_threads) == (64, 0, 1)


@pytest.mark.parametrize("deployment, message", [
    ({"max_batch_size": -1}, "models[0].deployments[0].max_batch_size"),
    ({"intra_op_num_threads": 0}, "models[0].deployments[0].intra_op_num_threads"),
    ({"version": "a/b"}, "models[0].deployments[0].version"),
    ({"engine": {}}, "models[0].deployments[0].engine: Extra inputs are not permitted"),
    ({"price": {"per_1k_predictions": 1, "input": 1, "output": 1}}, "or per_1k_predictions"),
])
def test_bad_onnx_options_name_their_key(deployment, message):
    with pytest.raises(ValueError) as e:
        parse_config(onnx_config(**deployment))
    assert message in str(e.value)


def test_predictions_are_priced_per_thousand_and_reserved_as_the_worst_case():
    remote = {"provider": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}
    config = parse_config({"models": [
        {"name": "fraud", "fallbacks": {"default": ["fraud-b"]}, "price": {"per_1k_predictions": 0.5},
         "deployments": [{"provider": "onnx", "model": "a.onnx", "name": "a"}]},
        {"name": "fraud-b", "deployments": [{"provider": "onnx", "model": "b.onnx", "name": "b",
                                             "price": {"per_1k_predictions": 2.0}}]},
        {"name": "chat", "deployments": [{**remote, "name": "c", "price": {"input": 1, "output": 2}}]}]})
    book = PriceBook.from_config(config)
    assert book.price("a") == Price(per_1k_predictions=0.5)
    assert book.price("a").cost(0, 0, 0, predictions=40) == pytest.approx(0.02)
    assert book.price("a").cost(0, 0, 0, predictions=40, batch=True) == pytest.approx(0.01)
    assert book.worst("fraud").per_1k_predictions == 2.0  # the fallback could answer
    assert book.price("c").cost(1000, 0, 1000, predictions=5) == pytest.approx(0.003)  # tokens only
    # an infer call reserves no tokens: a team's tokens-per-minute limit is not spent on tensors
    meter = asyncio.run(Metering(None, book).begin_predictions(None, "fraud", "fraud", "r1", predictions=40))
    assert meter.ticket.demand.tokens == 0
    assert meter.ticket.demand.cost_usd == pytest.approx(40 * 2.0 / 1000)  # the worst deployment's price
