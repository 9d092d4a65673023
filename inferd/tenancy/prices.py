"""The price book: what a deployment's tokens cost, and the worst a request to a model could cost.

Prices come from the gateway config: a deployment's own `price`, else its
group's, else free (a self-hosted model nobody priced). `worst(group)` is the
highest input and output price among every deployment that could answer a
request to that group, following its fallback chains and degradation target,
because budgets reserve before anyone knows which deployment will answer.
Tensor models are priced per prediction (a row scored), per 1,000 of them. The
replicas of a Ray deployment (`chat/0#1`) cost what their deployment costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.gateway.config import GatewayConfig, PriceSpec, replica_of


@dataclass(frozen=True)
class Price:
    """USD per million tokens (and per 1,000 predictions, for tensor models)."""

    input: float = 0.0
    cached_input: float = 0.0
    output: float = 0.0
    batch_discount: float = 0.5
    per_1k_predictions: float = 0.0

    @classmethod
    def from_spec(cls, spec: PriceSpec | None) -> Price:
        if spec is None:
            return FREE
        inp, cached, out = spec.per_million()
        return cls(inp, cached, out, spec.batch_discount, spec.per_1k_predictions or 0.0)

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int, batch: bool = False,
             predictions: int = 0) -> float:
        cached = min(cached_tokens, prompt_tokens)
        usd = ((prompt_tokens - cached) * self.input + cached * self.cached_input
               + completion_tokens * self.output) / 1e6 + predictions * self.per_1k_predictions / 1e3
        return usd * (1.0 - self.batch_discount) if batch else usd


FREE = Price()


class PriceBook:
    def __init__(self, by_deployment: dict[str, Price], worst_by_group: dict[str, Price]):
        self._by_deployment = by_deployment
        self._worst = worst_by_group

    @classmethod
    def from_config(cls, config: GatewayConfig) -> PriceBook:
        by_deployment: dict[str, Price] = {}
        own: dict[str, list[Price]] = {}
        for g in config.models:
            prices = [Price.from_spec(d.price or g.price) for d in g.deployments]
            by_deployment.update({d.name: p for d, p in zip(g.deployments, prices)})
            own[g.name] = prices
        names = {n: g.name for g in config.models for n in (g.name, *g.aliases)}
        successors = {g.name: {names[t] for chain in g.fallbacks.values() for t in chain}
                      | ({names[g.degrade_to]} if g.degrade_to else set()) for g in config.models}
        worst = {}
        for g in config.models:
            seen, todo = set(), [g.name]
            while todo:  # every group a request to g could end up in
                name = todo.pop()
                if name not in seen:
                    seen.add(name)
                    todo.extend(successors[name])
            candidates = [p for name in seen for p in own[name]]
            worst[g.name] = Price(max(p.input for p in candidates), max(p.cached_input for p in candidates),
                                  max(p.output for p in candidates),
                                  min(p.batch_discount for p in candidates),
                                  max(p.per_1k_predictions for p in candidates))
        return cls(by_deployment, worst)

    def price(self, deployment: str | None) -> Price:
        if not deployment:
            return FREE
        return self._by_deployment.get(deployment) or self._by_deployment.get(replica_of(deployment), FREE)

    def worst(self, group: str) -> Price:
        return self._worst.get(group, FREE)
