"""Routing strategies: in which order to try the deployments that serve one model.

A strategy only orders; it never filters. The router walks the order, skips deployments
whose circuit breaker does not allow an attempt, and falls back along it on retryable
failures, so every strategy returns all candidates. Strategies:

- `weighted_random`: weighted sampling without replacement (traffic splits by weight).
- `least_in_flight`: fewest requests in flight first.
- `lowest_latency`: lowest TTFT EWMA first; never-measured deployments go first so they
  get measured.
- `lowest_cost`: cheapest per million tokens first, unknown prices last.
- `prefix_affinity`: the same prompt prefix goes to the same deployment, so its prefix
  cache is hit, unless that deployment is overloaded.

Ties are broken by the injected `random.Random`, so equal deployments share load and tests
stay exact. `make_strategy(name, rng)` builds one from the config's name;
`routing_key_for(body, endpoint)` derives the key `prefix_affinity` hashes.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from inferd.gateway.stats import DeploymentStats
from inferd.wire.request import InferenceRequest
from inferd.wire.schema import ChatMessage, content_text


class Candidate(Protocol):
    """What a strategy needs to know of a deployment."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...

    @property
    def stats(self) -> DeploymentStats: ...

    @property
    def cost_per_mtok(self) -> float | None: ...


C = TypeVar("C", bound=Candidate)


class RoutingStrategy(Protocol):
    name: str
    uses_routing_key: bool  # whether `order` reads the key (the router derives it only then)

    def order(self, candidates: Sequence[C], routing_key: str | None = None) -> list[C]: ...


class _RandomTies:
    """Base of the strategies that sort by a key and break ties at random."""

    name = ""
    uses_routing_key = False

    def __init__(self, rng: random.Random):
        self.rng = rng

    def _sorted(self, candidates: Sequence[C], key: Callable[[C], tuple]) -> list[C]:
        # One draw per candidate, appended last to the key, decides ties without bias.
        keyed = [(key(c), self.rng.random(), i) for i, c in enumerate(candidates)]
        keyed.sort()
        return [candidates[i] for _, _, i in keyed]


class WeightedRandom(_RandomTies):
    """Weighted sampling without replacement: P(first) = weight / total weight, and so on down.

    Each candidate draws an exponential "arrival time" with rate equal to its weight and the
    earliest arrives first (exponential clocks; Efraimidis-Spirakis). Weights <= 0 go last.
    """

    name = "weighted_random"

    def order(self, candidates: Sequence[C], routing_key: str | None = None) -> list[C]:
        return self._sorted(candidates, lambda c: (self.rng.expovariate(c.weight) if c.weight > 0 else math.inf,))


class LeastInFlight(_RandomTies):
    name = "least_in_flight"

    def order(self, candidates: Sequence[C], routing_key: str | None = None) -> list[C]:
        return self._sorted(candidates, lambda c: (c.stats.in_flight,))


class LowestLatency(_RandomTies):
    name = "lowest_latency"

    def order(self, candidates: Sequence[C], routing_key: str | None = None) -> list[C]:
        def key(c: C) -> tuple:
            ttft = c.stats.ttft_ewma
            return (0, 0.0) if ttft is None else (1, ttft)
        return self._sorted(candidates, key)


class LowestCost(_RandomTies):
    name = "lowest_cost"

    def order(self, candidates: Sequence[C], routing_key: str | None = None) -> list[C]:
        def key(c: C) -> tuple:
            cost = c.cost_per_mtok
            return (cost is None, cost or 0.0, c.stats.in_flight)
        return self._sorted(candidates, key)


class PrefixAffinity(_RandomTies):
    """Rendezvous (highest-random-weight) hashing of the routing key, with bounded load.

    Each candidate scores `weight / -ln(h)`, h being a hash of (key, name) mapped into
    (0, 1): with equal weights that is plain rendezvous hashing, otherwise each candidate
    is first for a share of keys proportional to its weight. A key's order depends only on
    the key and the candidate names, so the same key gets the same first choice while the
    set is unchanged, and removing a candidate moves only the keys it was first for.

    Bounded load: a candidate with more than `load_factor * least + load_slack` requests in
    flight (least: the least loaded candidate's count) moves to the back, in least-in-flight
    order. The key's next choice in rendezvous order takes over, the same one for every
    request with that key, so one hot prefix spills onto a second replica (warming its
    cache for that prefix) instead of melting the first. With no key it is least_in_flight.
    """

    name = "prefix_affinity"
    uses_routing_key = True

    def __init__(self, rng: random.Random, load_factor: float = 2.0, load_slack: int = 4):
        super().__init__(rng)
        if load_factor < 1 or load_slack < 0:
            raise ValueError(f"need load_factor >= 1 and load_slack >= 0, got {load_factor}, {load_slack}")
        self.load_factor, self.load_slack = load_factor, load_slack

    def order(self, candidates: Sequence[C], routing_key: str | None = None) -> list[C]:
        if routing_key is None or not candidates:
            return self._sorted(candidates, lambda c: (c.stats.in_flight,))
        bound = self.load_factor * min(c.stats.in_flight for c in candidates) + self.load_slack
        ranked = sorted(candidates, key=lambda c: (-_rendezvous_score(routing_key, c), c.name))
        within = [c for c in ranked if c.stats.in_flight <= bound]
        over = self._sorted([c for c in ranked if c.stats.in_flight > bound], lambda c: (c.stats.in_flight,))
        return within + over


def _rendezvous_score(key: str, candidate: Candidate) -> float:
    if candidate.weight <= 0:
        return -math.inf
    digest = hashlib.blake2b(f"{key}\0{candidate.name}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 0.5) / 2.0 ** 64   # uniform in (0, 1), never 0 or 1
    return candidate.weight / -math.log(h)


STRATEGIES: dict[str, Callable[[random.Random], RoutingStrategy]] = {
    cls.name: cls for cls in (WeightedRandom, LeastInFlight, LowestLatency, LowestCost, PrefixAffinity)
}


def make_strategy(name: str, rng: random.Random | None = None) -> RoutingStrategy:
    """The strategy called `name`, drawing its randomness from `rng` (a fresh one if None)."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown routing strategy {name!r}; allowed: {', '.join(sorted(STRATEGIES))}") from None
    return factory(rng if rng is not None else random.Random())


#: how much of the prompt the affinity key covers: enough to tell system prompts apart,
#: short enough that requests sharing a cached prefix share a key
PREFIX_CHARS = 256


def routing_key_for(request: InferenceRequest, max_chars: int = PREFIX_CHARS) -> str | None:
    """The prefix-affinity key of a request, or None when it has none.

    chat: the system (and developer) messages and the first user message, which is the
    part of the rendered prompt shared across turns of a conversation and across users of
    one system prompt; completions: the start of the (first) prompt; embeddings: None (no
    prefix cache to aim at). The key is a hash of the first `max_chars` characters.
    """
    if request.endpoint == "chat":
        prefix = _chat_prefix(request.body.messages)
    elif request.endpoint == "completions":
        prefix = _prompt_prefix(request.body.prompt)
    else:
        return None
    if not prefix:
        return None
    return hashlib.blake2b(prefix[:max_chars].encode(), digest_size=16).hexdigest()


def _chat_prefix(messages: list[ChatMessage]) -> str:
    parts: list[str] = []
    for message in messages:
        if message.role in ("system", "developer", "user"):
            parts.append(f"{message.role}\0{content_text(message.content)}")
        if message.role == "user":
            break
    return "\0".join(parts)


def _prompt_prefix(prompt: str | list[int] | list[str] | list[list[int]]) -> str:
    # A batch of prompts routes as one request: key it by its first prompt.
    if prompt and isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    return " ".join(str(t) for t in prompt)   # token ids
