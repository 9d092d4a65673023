"""The gateway's declarative config (`inferd serve --config inferd.yaml`), validated at start.

```yaml
models:
  - name: chat                      # the public model name clients send
    aliases: [gpt-4o-mini]
    routing: least_in_flight        # weighted_random | least_in_flight | lowest_latency
                                    # | lowest_cost | prefix_affinity
    slo_ttft_ms: 2000               # predicted TTFT above this -> degrade_to, or 503 + Retry-After
    degrade_to: chat-small
    fallbacks: {default: [chat-remote], context_length: [chat-long]}
    retry: {max_retries: 2, base_s: 0.25, max_s: 8, max_retry_after_s: 30}
    circuit_breaker: {failure_threshold: 5, cooldown_s: 30}
    deployments:
      - provider: local             # inferd's own engine; model: a path, a .gguf, or omitted (default)
        engine: {max_num_seqs: 16, kv_cache_bytes: 512MiB}
        price: {input: 0.02, output: 0.08}   # USD per million tokens
      - provider: ray               # the same engine as replicas on a Ray cluster (docs/scale-out.md)
        address: auto
        replicas: 2                 # autoscaled on queue depth between min_replicas and max_replicas
        num_cpus: 4
        num_gpus: 1
      - provider: openai            # any OpenAI-compatible server
        base_url: https://api.example.com/v1
        model: gpt-4o-mini
        api_key_env: EXAMPLE_API_KEY
        timeouts: {connect: 5, first_token: 30, total: 300, stream_silence: 20}
      - provider: anthropic
        model: claude-haiku-4-5
        api_key_env: ANTHROPIC_API_KEY
  - name: fraud                     # a tabular model on /v2/models/fraud/infer (docs/classic_ml.md)
    deployments:
      - provider: onnx              # an .onnx file, or a pickled/joblib scikit-learn model
        model: fraud.onnx
        max_batch_size: 64
        max_queue_delay_microseconds: 200
        price: {per_1k_predictions: 0.01}
```

Every mistake is reported with the path of the offending key
(`models[0].deployments[1].base_url: Field required`), and references between
groups (fallbacks, degrade_to) are checked, so a config either starts whole or not
at all. Engine options are the `EngineConfig` fields; the CLI's engine flags are
their defaults.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from inferd.engine.config import EngineConfig
from inferd.engine.embedding.spec import EmbedConfig
from inferd.providers.base import Timeouts

Routing = Literal["weighted_random", "least_in_flight", "lowest_latency", "lowest_cost", "prefix_affinity"]
FALLBACK_CLASSES = ("default", "rate_limit", "server", "timeout", "context_length")
MAX_REPLICAS = 64
ENGINE_PROVIDERS = ("local", "ray")  # inferd's own engine: a queue the admission control can predict


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PriceSpec(_Spec):
    """What tokens cost, in one of two forms.

    A price list (remote providers): `input`, `output` and `cached_input` in USD per
    million tokens. Or a running cost (self-hosted): `hourly_usd` for the machine and
    the `tokens_per_s` it processes (from `inferd bench throughput`), which prices
    every computed token, prompt or output, at hourly_usd / 3600 / tokens_per_s;
    prompt tokens served from the prefix cache are not computed and cost nothing.
    Tensor models (`provider: onnx`) are priced per prediction instead:
    `per_1k_predictions` USD per 1,000 rows scored.
    """

    input: float | None = Field(None, ge=0)
    output: float | None = Field(None, ge=0)
    cached_input: float | None = Field(None, ge=0)
    hourly_usd: float | None = Field(None, ge=0)
    tokens_per_s: float | None = Field(None, gt=0)
    per_1k_predictions: float | None = Field(None, ge=0)
    batch_discount: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _one_form(self) -> PriceSpec:
        listed = self.input is not None or self.output is not None or self.cached_input is not None
        running = self.hourly_usd is not None or self.tokens_per_s is not None
        predictions = self.per_1k_predictions is not None
        if listed + running + predictions != 1:
            raise ValueError("give either input and output (USD per million tokens), hourly_usd and "
                             "tokens_per_s, or per_1k_predictions")
        if listed and (self.input is None or self.output is None):
            raise ValueError("a price list needs both input and output")
        if running and (self.hourly_usd is None or self.tokens_per_s is None):
            raise ValueError("a running cost needs both hourly_usd and tokens_per_s")
        return self

    def per_million(self) -> tuple[float, float, float]:
        """(input, cached input, output) in USD per million tokens."""
        if self.per_1k_predictions is not None:
            return 0.0, 0.0, 0.0
        if self.hourly_usd is not None:
            per_token = self.hourly_usd / 3600.0 / self.tokens_per_s
            return per_token * 1e6, 0.0, per_token * 1e6
        cached = self.cached_input if self.cached_input is not None else self.input
        return self.input, cached, self.output


class TimeoutsSpec(_Spec):
    connect: float | None = Field(Timeouts.connect, gt=0)
    first_token: float | None = Field(Timeouts.first_token, gt=0)
    total: float | None = Field(Timeouts.total, gt=0)
    stream_silence: float | None = Field(Timeouts.stream_silence, gt=0)


class _DeploymentSpec(_Spec):
    name: str | None = None
    weight: float = Field(1.0, gt=0)
    price: PriceSpec | None = None


class _EngineSpec(_DeploymentSpec):
    """A model on inferd's own engine: where it runs is the subclass's business."""

    model: str | None = None  # HF directory or .gguf; None: the embedded default model
    engine: dict = Field(default_factory=dict)
    max_waiting_requests: int = Field(256, ge=0)


class LocalSpec(_EngineSpec):
    provider: Literal["local"]
    task: Literal["generate", "embed"] = "generate"


class AutoscaleSpec(_Spec):
    """How a Ray deployment's replica count follows its load (gateway/autoscale.py)."""

    # requests waiting per replica, beyond those it runs at once (its max_num_seqs), that a replica
    # is sized for: more than that for `upscale_delay_s` adds replicas, less for `downscale_delay_s`
    # removes them
    target_queue: float = Field(2.0, ge=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    interval_s: float = Field(1.0, gt=0, le=60)


class RaySpec(_EngineSpec):
    """Engine replicas placed on a Ray cluster, each an actor on a node that has its resources; the
    gateway routes to them as to local engines (providers/ray_replica.py, gateway/replicas.py)."""

    provider: Literal["ray"]
    address: str | None = None       # a cluster ("auto", "10.0.0.5:6379"); None: start Ray on this machine
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    min_replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)   # None: replicas (no autoscaling down)
    max_replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)   # None: replicas (no autoscaling up)
    num_cpus: float = Field(1.0, gt=0)    # per replica; also its engine's torch threads, unless engine: says
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources per replica
    # the address of this server that replicas send their tokens to; None: this node's address in Ray
    link_host: str | None = None
    start_timeout_s: float = Field(600.0, gt=0)  # waiting for resources and loading the model
    autoscale: AutoscaleSpec = Field(default_factory=AutoscaleSpec)

    @model_validator(mode="after")
    def _bounds(self) -> RaySpec:
        if self.address and self.address.startswith("ray://"):
            # a Ray Client driver is not a node of the cluster: replicas could not be told an address of this
            # server that they reach, nor the server learn of their deaths as a node does
            raise ValueError("address: Ray Client (ray://) is not supported; run inferd serve on a node of the "
                             "cluster (ray start --address=HEAD:6379) and give address: auto")
        self.min_replicas = self.replicas if self.min_replicas is None else self.min_replicas
        self.max_replicas = self.replicas if self.max_replicas is None else self.max_replicas
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"need min_replicas <= replicas <= max_replicas, got {self.min_replicas}, "
                             f"{self.replicas}, {self.max_replicas}")
        return self


def replica_name(deployment: str, slot: int) -> str:
    """The name of replica `slot` of a Ray deployment: what headers, metrics and the ledger show."""
    return f"{deployment}#{slot}"


def replica_of(name: str) -> str:
    """The deployment a replica's name belongs to (a name that is no replica's: itself)."""
    base, sep, slot = name.rpartition("#")
    return base if sep and slot.isdigit() else name


class _RemoteSpec(_DeploymentSpec):
    model: str
    api_key_env: str | None = None
    timeouts: TimeoutsSpec = Field(default_factory=TimeoutsSpec)
    headers: dict[str, str] = Field(default_factory=dict)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class OpenAISpec(_RemoteSpec):
    provider: Literal["openai"]
    base_url: str
    # the server continues a final assistant message given vLLM's `continue_final_message` (vLLM, inferd,
    # SGLang do; OpenAI does not): the gateway then finishes a broken stream there (docs/gateway.md)
    prefill: bool = False


class AnthropicSpec(_RemoteSpec):
    provider: Literal["anthropic"]
    base_url: str = "https://api.anthropic.com"
    version: str = "2023-06-01"


class OnnxSpec(_DeploymentSpec):
    """A tensor model run by ONNX Runtime, served on the Open Inference Protocol (/v2); the batcher's
    options have Triton's names (inferd/classic/)."""

    provider: Literal["onnx"]
    model: str                      # an .onnx file, or a pickled/joblib scikit-learn model
    version: str = Field("1", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    max_batch_size: int = Field(64, ge=0, le=65536)   # 0: every request runs alone
    max_queue_delay_microseconds: int = Field(0, ge=0, le=1_000_000)
    intra_op_num_threads: int = Field(1, ge=1, le=256)


DeploymentSpec = Annotated[LocalSpec | RaySpec | OpenAISpec | AnthropicSpec | OnnxSpec,
                           Field(discriminator="provider")]


class RetrySpec(_Spec):
    max_retries: int = Field(2, ge=0, le=10)
    base_s: float = Field(0.25, ge=0)
    max_s: float = Field(8.0, ge=0)
    max_retry_after_s: float = Field(30.0, ge=0)


class BreakerSpec(_Spec):
    failure_threshold: int = Field(5, ge=1)
    cooldown_s: float = Field(30.0, gt=0)


class CanarySpec(_Spec):
    """When a canary version is rolled back on its own (docs/models.md): once it has answered
    `min_requests` requests, if its error rate exceeds the stable version's by more than
    `max_error_rate_increase` (absolute: 0.05 is five points), or its P95 time to first token exceeds
    the stable version's by more than `max_ttft_p95_increase` (relative: 0.5 is 50% slower)."""

    auto_rollback: bool = True
    min_requests: int = Field(20, ge=1)
    max_error_rate_increase: float = Field(0.05, ge=0, le=1)
    max_ttft_p95_increase: float | None = Field(0.5, ge=0)


class ModelGroupSpec(_Spec):
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    routing: Routing = "least_in_flight"
    deployments: list[DeploymentSpec] = Field(min_length=1)
    fallbacks: dict[Literal[FALLBACK_CLASSES], list[str]] = Field(default_factory=dict)
    degrade_to: str | None = None
    slo_ttft_ms: float | None = Field(None, gt=0)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    circuit_breaker: BreakerSpec = Field(default_factory=BreakerSpec)
    price: PriceSpec | None = None  # for its deployments that name no price of their own
    canary: CanarySpec = Field(default_factory=CanarySpec)


class GatewayConfig(_Spec):
    models: list[ModelGroupSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_references(self) -> GatewayConfig:
        names: dict[str, str] = {}
        for i, g in enumerate(self.models):
            for n in (g.name, *g.aliases):
                if n in names:
                    raise ValueError(f"models[{i}]: the name {n!r} is already used by {names[n]!r}")
                names[n] = g.name
        deployment_names: set[str] = set()
        for i, g in enumerate(self.models):
            where = f"models[{i}] ({g.name})"
            for j, d in enumerate(g.deployments):
                d.name = d.name or f"{g.name}/{j}"
                if d.name in deployment_names:
                    raise ValueError(f"{where}.deployments[{j}].name: {d.name!r} is used twice")
                if replica_of(d.name) != d.name:
                    raise ValueError(f"{where}.deployments[{j}].name: {d.name!r} ends like a replica's name "
                                     "(#<number>); choose another")
                deployment_names.add(d.name)
            for cls, targets in g.fallbacks.items():
                for t in targets:
                    if t not in names:
                        raise ValueError(f"{where}.fallbacks.{cls}: no model group is named {t!r}")
                    if names[t] == g.name:
                        raise ValueError(f"{where}.fallbacks.{cls}: a group cannot fall back to itself")
            if g.degrade_to is not None:
                if g.degrade_to not in names:
                    raise ValueError(f"{where}.degrade_to: no model group is named {g.degrade_to!r}")
                if names[g.degrade_to] == g.name:
                    raise ValueError(f"{where}.degrade_to: a group cannot degrade to itself")
            if g.slo_ttft_ms is not None and not any(d.provider in ENGINE_PROVIDERS for d in g.deployments):
                raise ValueError(f"{where}.slo_ttft_ms: needs a local deployment (its queue is what is predicted)")
        addresses = {d.address for g in self.models for d in g.deployments if isinstance(d, RaySpec)}
        if len(addresses) > 1:  # one Ray connection per process
            raise ValueError(f"every provider: ray deployment must name the same address, got "
                             f"{', '.join(sorted(map(str, addresses)))}")
        return self


def _error_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("local", "ray", "openai", "anthropic", "onnx") and out.endswith("]"):
            continue  # the discriminator's branch name is noise in the path
        else:
            out += f".{part}" if out else str(part)
    return out


def _problems(e: ValidationError, source: str) -> ValueError:
    lines = []
    for err in e.errors()[:10]:
        path = _error_path(err.get("loc", ()))
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")
    return ValueError(f"{source} is invalid:\n" + "\n".join(lines))


def parse_config(data: object, source: str = "config") -> GatewayConfig:
    """Validate a loaded config; ValueError lists each problem with its key path."""
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise _problems(e, source) from None


_DEPLOYMENTS = TypeAdapter(list[DeploymentSpec])


def parse_deployments(data: object, source: str = "spec") -> list[LocalSpec | OpenAISpec | AnthropicSpec | OnnxSpec]:
    """A model version's spec: one deployment (a mapping as under `deployments:`) or a list of them."""
    if isinstance(data, dict) and "deployments" in data and "provider" not in data:
        data = data["deployments"]
    items = data if isinstance(data, list) else [data]
    try:
        specs = _DEPLOYMENTS.validate_python(items)
    except ValidationError as e:
        raise _problems(e, source) from None
    if not specs:
        raise ValueError(f"{source} is invalid:\n  a version needs at least one deployment")
    return specs


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read the config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    return parse_config(data, str(path))


def _engine_block(cls, spec: LocalSpec, where: str, make, what: str = ""):
    """`make()` an options object of dataclass `cls` from the deployment's `engine:` block; every
    problem (an unknown key, a bad value) is a ValueError naming `<where>.engine`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec.engine) - known)
    if unknown:
        raise ValueError(f"{where}.engine: unknown option(s) {', '.join(unknown)}{what}; "
                         f"allowed: {', '.join(sorted(known - {'model', 'progress'}))}")
    try:
        return make()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}.engine: {e}") from None


def local_engine_config(spec: _EngineSpec, base: EngineConfig, where: str) -> EngineConfig:
    """The CLI's engine options overridden by the deployment's `engine:` block."""
    return _engine_block(EngineConfig, spec, where,
                         lambda: dataclasses.replace(base, model=spec.model, **spec.engine))


def local_embed_config(spec: LocalSpec, base: EngineConfig, where: str) -> EmbedConfig:
    """An embedding deployment's options: `EmbedConfig` fields; device and threads default to the CLI's."""
    defaults = {"device": base.device, "num_threads": base.num_threads}
    if base.dtype != "auto":
        defaults["dtype"] = base.dtype
    return _engine_block(EmbedConfig, spec, where,
                         lambda: EmbedConfig(model=spec.model, **{**defaults, **spec.engine}),
                         " for an embedding model")


def single_model_config(name: str, model: str | None, embedding: tuple[str, str | None] | None = None
                        ) -> GatewayConfig:
    """What `inferd serve MODEL [--embedding-model E]` means without a config: one group per model."""
    groups = [ModelGroupSpec(name=name, deployments=[LocalSpec(provider="local", model=model, name=name)])]
    if embedding is not None:
        ename, emodel = embedding
        groups.append(ModelGroupSpec(name=ename, deployments=[LocalSpec(provider="local", task="embed",
                                                                        model=emodel, name=ename)]))
    return GatewayConfig(models=groups)
