"""The price book and the worst-case estimates that budgets reserve."""

from __future__ import annotations

import pytest

from inferd.gateway.config import parse_config
from inferd.tenancy import estimate
from inferd.tenancy.prices import FREE, Price, PriceBook
from tests.typed import typed


def config():
    remote = {"provider": "openai", "base_url": "http://127.0.0.1:1/v1"}
    return parse_config({"models": [
        {"name": "small", "price": {"hourly_usd": 3.6, "tokens_per_s": 1000},
         "fallbacks": {"default": ["big"]},
         "deployments": [{"provider": "local", "name": "small-local"}]},
        {"name": "big", "degrade_to": "cheap",
         "deployments": [{**remote, "model": "m1", "name": "big-a", "price": {"input": 2, "output": 8}},
                         {**remote, "model": "m2", "name": "big-b", "price": {"input": 3, "output": 6,
                                                                           "cached_input": 1}}]},
        {"name": "cheap", "deployments": [{**remote, "model": "m3", "name": "cheap-a"}]},
    ]})


def test_deployment_prices_and_running_cost():
    book = PriceBook.from_config(config())
    # 3.6 USD an hour at 1000 tokens/s = 1e-6 USD per token = 1 USD per million, cached prompt free
    assert book.price("small-local") == Price(1.0, 0.0, 1.0, 0.5)
    assert book.price("big-b").cost(1000, 400, 100) == pytest.approx((600 * 3 + 400 * 1 + 100 * 6) / 1e6)
    assert book.price("big-a").cost(1000, 400, 100) == pytest.approx((1000 * 2 + 100 * 8) / 1e6)
    assert book.price("big-a").cost(1000, 0, 100, batch=True) == pytest.approx((1000 * 2 + 100 * 8) / 2e6)
    assert book.price("cheap-a") is FREE and book.price(None) is FREE


def test_worst_case_follows_fallbacks_and_degradation():
    book = PriceBook.from_config(config())
    assert (book.worst("small").input, book.worst("small").output) == (3, 8)  # small -> big (a or b)
    assert (book.worst("big").input, book.worst("big").output) == (3, 8)
    assert book.worst("cheap").output == 0


def test_price_spec_needs_one_complete_form():
    for bad in ({"input": 1}, {"hourly_usd": 2}, {"input": 1, "output": 2, "hourly_usd": 3}, {}):
        with pytest.raises(ValueError, match="price"):
            parse_config({"models": [{"name": "m", "price": bad, "deployments": [{"provider": "local"}]}]})


def test_estimates():
    chat = {"messages": [{"role": "system", "content": "héllo"},
                         {"role": "user", "content": [{"type": "text", "text": "abc"}]}], "max_tokens": 7, "n": 2}
    assert estimate.prompt_bound(typed("chat", chat)) == 64 + (6 + 8) + (3 + 8)
    assert estimate.output_bound(typed("chat", chat)) == 14
    assert estimate.output_bound(typed("chat", {"messages": [{"role": "user", "content": "x"}]}), default_max_output=512) == 512
    assert estimate.prompt_bound(typed("completions", {"prompt": [1, 2, 3]})) == 3
    assert estimate.prompt_bound(typed("completions", {"prompt": ["ab", "cde"]})) == 5
    assert estimate.output_bound(typed("completions", {"prompt": ["ab", "cde"], "max_tokens": 4})) == 8
    assert estimate.prompt_bound(typed("embeddings", {"input": [[1, 2], [3]]})) == 3
    assert estimate.output_bound(typed("embeddings", {"input": "x"})) == 0
