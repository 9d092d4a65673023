"""Routing strategies: orderings, distributions and prefix-affinity stability."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from inferd.gateway.stats import DeploymentStats
from inferd.gateway.strategies import STRATEGIES, PrefixAffinity, make_strategy, routing_key_for
from inferd.wire.errors import InferdError
from tests.typed import typed


@dataclass
class Dep:
    name: str
    weight: float = 1.0
    cost_per_mtok: float | None = None
    stats: DeploymentStats = field(default_factory=DeploymentStats)

    def load(self, n: int) -> Dep:
        for _ in range(n):
            self.stats.started()
        return self


def _names(deps) -> list[str]:
    return [d.name for d in deps]


def _deps(n: int) -> list[Dep]:
    return [Dep(f"d{i}") for i in range(n)]


def test_registry_and_factory():
    assert set(STRATEGIES) == {"weighted_random", "least_in_flight", "lowest_latency", "lowest_cost",
                               "prefix_affinity"}
    for name in STRATEGIES:
        assert make_strategy(name, random.Random(0)).name == name
    with pytest.raises(ValueError, match="allowed: least_in_flight, lowest_cost, lowest_latency, "
                                         "prefix_affinity, weighted_random"):
        make_strategy("round_robin", random.Random(0))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_orders_all_candidates_and_drops_none(name):
    strategy = make_strategy(name, random.Random(3))
    deps = [Dep("a", weight=0.0).load(9), Dep("b", cost_per_mtok=1.0).load(1), Dep("c", weight=5).load(4),
            Dep("d").load(0)]
    deps[2].stats.observe_ttft(0.2)
    for key in (None, "k1", "k2"):
        ordered = strategy.order(deps, key)
        assert sorted(_names(ordered)) == ["a", "b", "c", "d"]
    assert strategy.order([], "k") == []


def test_weighted_random_first_choice_follows_the_weights():
    strategy = make_strategy("weighted_random", random.Random(1234))
    deps = [Dep("a", weight=1), Dep("b", weight=2), Dep("c", weight=7), Dep("z", weight=0)]
    n = 10_000
    orders = [_names(strategy.order(deps, None)) for _ in range(n)]
    first = Counter(o[0] for o in orders)
    assert first["a"] / n == pytest.approx(0.1, abs=0.02)
    assert first["b"] / n == pytest.approx(0.2, abs=0.02)
    assert first["c"] / n == pytest.approx(0.7, abs=0.02)
    assert all(o[-1] == "z" for o in orders)            # zero weight: only as a last resort
    # Without replacement: after c, b comes next with probability 2 / (1 + 2).
    after_c = [o[1] for o in orders if o[0] == "c"]
    assert after_c.count("b") / len(after_c) == pytest.approx(2 / 3, abs=0.03)


def test_weighted_random_is_reproducible_with_the_same_seed():
    deps = [Dep("a", weight=1), Dep("b", weight=3), Dep("c", weight=2)]
    runs = []
    for _ in range(2):
        strategy = make_strategy("weighted_random", random.Random(9))
        runs.append([_names(strategy.order(deps, None)) for _ in range(20)])
    assert runs[0] == runs[1]
    assert len({tuple(o) for o in runs[0]}) > 1      # but not the same order every time


def test_least_in_flight_orders_by_load_and_spreads_ties():
    strategy = make_strategy("least_in_flight", random.Random(5))
    deps = [Dep("a").load(3), Dep("b").load(1), Dep("c").load(2)]
    assert _names(strategy.order(deps, None)) == ["b", "c", "a"]
    tied = [Dep("x"), Dep("y"), Dep("busy").load(1)]
    firsts = Counter(_names(strategy.order(tied, None))[0] for _ in range(2000))
    assert firsts["busy"] == 0
    assert firsts["x"] / 2000 == pytest.approx(0.5, abs=0.05)


def test_lowest_latency_measures_unknown_deployments_first():
    strategy = make_strategy("lowest_latency", random.Random(0))
    slow, fast, new = Dep("slow"), Dep("fast"), Dep("new")
    slow.stats.observe_ttft(2.0)
    fast.stats.observe_ttft(0.1)
    assert _names(strategy.order([slow, fast, new], None)) == ["new", "fast", "slow"]
    new.stats.observe_ttft(0.5)
    assert _names(strategy.order([slow, fast, new], None)) == ["fast", "new", "slow"]


def test_lowest_cost_unknown_last_ties_by_in_flight():
    strategy = make_strategy("lowest_cost", random.Random(0))
    deps = [Dep("unknown"), Dep("dear", cost_per_mtok=2.0), Dep("cheap_busy", cost_per_mtok=0.5).load(3),
            Dep("cheap_idle", cost_per_mtok=0.5).load(1), Dep("free", cost_per_mtok=0.0).load(50)]
    assert _names(strategy.order(deps, None)) == ["free", "cheap_idle", "cheap_busy", "dear", "unknown"]


KEYS = [f"prefix-{i}" for i in range(1000)]


def _first_choices(strategy, deps) -> dict[str, str]:
    return {k: strategy.order(deps, k)[0].name for k in KEYS}


def test_prefix_affinity_same_key_same_choice_whatever_the_input_order():
    strategy = make_strategy("prefix_affinity", random.Random(0))
    deps = _deps(5)
    before = _first_choices(strategy, deps)
    shuffled = deps[:]
    random.Random(1).shuffle(shuffled)
    assert _first_choices(strategy, shuffled) == before
    assert _first_choices(make_strategy("prefix_affinity", random.Random(99)), deps) == before
    shares = Counter(before.values())
    assert all(150 <= shares[d.name] <= 250 for d in deps)   # about 1000 / 5 each


def test_prefix_affinity_removing_a_candidate_moves_only_its_keys():
    strategy = make_strategy("prefix_affinity", random.Random(0))
    deps = _deps(5)
    before = _first_choices(strategy, deps)
    after = _first_choices(strategy, [d for d in deps if d.name != "d2"])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "d2"}    # exactly the removed one's keys
    assert len(moved) / len(KEYS) == pytest.approx(1 / 5, abs=0.05)
    # ... and adding it back restores every key's choice
    assert _first_choices(strategy, deps) == before


def test_prefix_affinity_weights_set_the_share_of_keys():
    strategy = make_strategy("prefix_affinity", random.Random(0))
    shares = Counter(_first_choices(strategy, [Dep("big", weight=3), Dep("small", weight=1)]).values())
    assert shares["big"] / len(KEYS) == pytest.approx(0.75, abs=0.05)


def test_prefix_affinity_spills_an_overloaded_preferred_replica():
    strategy = PrefixAffinity(random.Random(0), load_factor=2.0, load_slack=4)
    deps = _deps(4)
    preferred = _names(strategy.order(deps, "hot"))
    hot, second = (next(d for d in deps if d.name == n) for n in preferred[:2])
    hot.load(4)                                      # at the bound (2 * 0 + 4): still preferred
    assert strategy.order(deps, "hot")[0] is hot
    hot.load(1)                                      # over it: the key's next choice takes over
    spilled = _names(strategy.order(deps, "hot"))
    assert spilled[0] == second.name and spilled[-1] == hot.name
    assert spilled[:3] == [n for n in preferred if n != hot.name]
    for d in deps:                                   # the bound follows the least loaded one
        if d is not hot:
            d.load(1)
    assert strategy.order(deps, "hot")[0] is hot     # 5 <= 2 * 1 + 4


def test_prefix_affinity_without_a_key_is_least_in_flight():
    strategy = make_strategy("prefix_affinity", random.Random(0))
    deps = [Dep("a").load(2), Dep("b"), Dep("c").load(1)]
    assert _names(strategy.order(deps, None)) == ["b", "c", "a"]


def test_prefix_affinity_rejects_bad_bounds():
    with pytest.raises(ValueError):
        PrefixAffinity(random.Random(0), load_factor=0.5)
    with pytest.raises(ValueError):
        PrefixAffinity(random.Random(0), load_slack=-1)


SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def _chat(*messages) -> dict:
    return {"model": "m", "messages": list(messages)}


def test_chat_key_covers_system_and_first_user_message():
    first = {"role": "user", "content": "Hello"}
    key = routing_key_for(typed("chat", _chat(SYSTEM, first)))
    assert key is not None and len(key) == 32
    # later turns of the same conversation keep the key (their prefix is cached there)
    later = _chat(SYSTEM, first, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "More"})
    assert routing_key_for(typed("chat", later)) == key
    # content parts read as their text
    parts = {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}
    assert routing_key_for(typed("chat", _chat(SYSTEM, parts))) == key
    assert routing_key_for(typed("chat", _chat(SYSTEM, {"role": "user", "content": "Bye"}))) != key
    assert routing_key_for(typed("chat", _chat({"role": "system", "content": "Other"}, first))) != key
    assert routing_key_for(typed("chat", _chat(first))) != key


def test_chat_key_is_truncated_so_a_long_shared_prefix_shares_it():
    long_system = {"role": "system", "content": "x" * 1000}
    a = routing_key_for(typed("chat", _chat(long_system, {"role": "user", "content": "a"})))
    b = routing_key_for(typed("chat", _chat(long_system, {"role": "user", "content": "b"})))
    assert a == b
    assert routing_key_for(typed("chat", _chat(long_system, {"role": "user", "content": "a"})), max_chars=2000) != \
        routing_key_for(typed("chat", _chat(long_system, {"role": "user", "content": "b"})), max_chars=2000)


def test_completions_key_uses_the_prompt_start():
    body = {"prompt": "p" * 256 + "tail one"}
    assert routing_key_for(typed("completions", body)) == routing_key_for(typed("completions", {"prompt": "p" * 256 + "other"}))
    assert routing_key_for(typed("completions", {"prompt": ["abc", "zzz"]})) == \
        routing_key_for(typed("completions", {"prompt": "abc"}))
    tokens = routing_key_for(typed("completions", {"prompt": [1, 2, 3]}))
    assert tokens is not None and tokens == routing_key_for(typed("completions", {"prompt": [[1, 2, 3], [4]]}))
    assert tokens != routing_key_for(typed("completions", {"prompt": [1, 2, 4]}))


@pytest.mark.parametrize("body,endpoint", [({"input": "text"}, "embeddings"), ({"prompt": ""}, "completions"),
                                           ({"messages": [{"role": "assistant", "content": "hi"}]}, "chat")])
def test_no_key_when_there_is_no_prefix(body, endpoint):
    assert routing_key_for(typed(endpoint, body)) is None


@pytest.mark.parametrize("body,endpoint", [({}, "chat"), ({"messages": "nope"}, "chat"), ({"messages": []}, "chat"),
                                           ({"prompt": 5}, "completions")])
def test_bodies_without_a_prompt_never_reach_routing(body, endpoint):
    with pytest.raises(InferdError) as info:
        typed(endpoint, body)
    assert info.value.status == 400
