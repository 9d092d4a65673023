"""Model versions in the store: each group's immutable versions, what it serves now, and its history.

A *version* of a model group is a list of deployment specs (as under a group's
`deployments:` in the config), each with its price filled in from the group's
when it names none, so a version alone says what it runs and what it costs. It
is stored as canonical JSON with a content hash and a label (`v1`, `v2`, ... or
one given at deploy time); deploying a spec whose hash a version of the group
already has deploys that version again instead of making a copy.

A *rollout* row says what a group serves: its stable version, and optionally a
canary with the percentage of API keys sent to it. Every change bumps the row's
`generation`, which is how replicas notice a change made elsewhere, and writes an
event (deploy, promote, rollback, load_failed, ...) to the group's history. A
change is written only if the generation is the one it was computed from, so two
replicas changing the same group at once cannot both win.

The config seeds the rollouts (`config_plan`): a group seen for the first time gets
its config's deployments as v1; a group whose config deployments changed since they
were last applied (`config_hash`) gets them as a new stable version; otherwise what
the store says (deploys made through the admin API since) is what is served.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass

from inferd.gateway.config import DeploymentSpec, GatewayConfig, ModelGroupSpec, PriceSpec, parse_deployments
from inferd.store.base import Tx

LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_AUTO_LABEL = re.compile(r"^v(\d+)$")
_LOCK = "inferd-model-versions"


class VersionError(ValueError):
    """A version operation that cannot be done: an HTTP status and a message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class Version:
    model: str
    label: str
    spec_hash: str
    specs: tuple[DeploymentSpec, ...]
    created: float

    def to_dict(self) -> dict:
        return {"model": self.model, "label": self.label, "hash": self.spec_hash, "created": self.created,
                "spec": [s.model_dump(mode="json", exclude_none=True) for s in self.specs]}


@dataclass(frozen=True)
class Rollout:
    """What a group serves: `canary_percent` of API keys go to `canary`, every other request to `stable`."""

    model: str
    stable: str
    canary: str | None = None
    canary_percent: float = 0.0
    generation: int = 0
    config_hash: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "stable": self.stable, "canary": self.canary,
                "canary_percent": self.canary_percent if self.canary else 0.0, "generation": self.generation}


def with_prices(specs: list, price: PriceSpec | None) -> list:
    """The specs, each with the group's price where it names none (a version carries its own prices)."""
    return [s if s.price is not None or price is None else s.model_copy(update={"price": price}) for s in specs]


def canonical(specs: list) -> str:
    return json.dumps([s.model_dump(mode="json") for s in specs], sort_keys=True, separators=(",", ":"))


def spec_hash(specs: list) -> str:
    return hashlib.sha256(canonical(specs).encode()).hexdigest()


def group_specs(g: ModelGroupSpec) -> list:
    """A config group's deployments as a version's specs."""
    return with_prices(list(g.deployments), g.price)


def deployment_name(group: str, label: str, spec, index: int) -> str:
    """The name a version's deployment serves under: its own (or `group/index`), with `@label` appended for
    every version but v1, so two versions of a group can run side by side and a group that never
    deploys keeps the names its config gave."""
    base = spec.name or f"{group}/{index}"
    return base if label == "v1" else f"{base}@{label}"


# ---- reads -------------------------------------------------------------------------------------------

_ROLLOUT_COLS = "model, stable, canary, canary_percent, generation, config_hash"


def _rollout(row) -> Rollout:
    return Rollout(row[0], row[1], row[2], float(row[3]), int(row[4]), row[5])


def rollouts(tx: Tx) -> dict[str, Rollout]:
    return {r[0]: _rollout(r) for r in tx.fetchall(f"SELECT {_ROLLOUT_COLS} FROM model_rollouts")}


def rollout(tx: Tx, model: str) -> Rollout | None:
    row = tx.fetchone(f"SELECT {_ROLLOUT_COLS} FROM model_rollouts WHERE model = ?", (model,))
    return None if row is None else _rollout(row)


def _version(row) -> Version:
    model, label, digest, spec, created = row
    return Version(model, label, digest, tuple(parse_deployments(json.loads(spec), f"{model}@{label}")), created)


def version(tx: Tx, model: str, label: str) -> Version | None:
    row = tx.fetchone("SELECT model, label, spec_hash, spec, created FROM model_versions WHERE model = ? AND "
                      "label = ?", (model, label))
    return None if row is None else _version(row)


def versions(tx: Tx, model: str) -> list[Version]:
    return [_version(r) for r in tx.fetchall("SELECT model, label, spec_hash, spec, created FROM model_versions "
                                             "WHERE model = ? ORDER BY created, label", (model,))]


def history(tx: Tx, model: str, limit: int = 100) -> list[dict]:
    """The group's events, newest first."""
    rows = tx.fetchall("SELECT ts, action, label, previous, canary_percent, reason FROM model_version_events "
                       f"WHERE model = ? ORDER BY ts DESC, id DESC LIMIT {int(limit)}", (model,))
    return [{"model": model, "ts": r[0], "action": r[1], "label": r[2], "previous": r[3], "canary_percent": r[4],
             "reason": r[5]} for r in rows]


def previous_stable(tx: Tx, model: str, stable: str) -> str | None:
    """The version that was stable before `stable` became it (what a rollback without a canary returns to)."""
    row = tx.fetchone("SELECT previous FROM model_version_events WHERE model = ? AND label = ? AND action IN "
                      "('deploy', 'promote', 'rollback', 'config') AND previous IS NOT NULL AND previous <> label "
                      "ORDER BY ts DESC, id DESC LIMIT 1", (model, stable))
    return None if row is None else row[0]


# ---- writes ------------------------------------------------------------------------------------------

def event(tx: Tx, model: str, action: str, now: float, *, label: str | None = None, previous: str | None = None,
          canary_percent: float | None = None, reason: str | None = None) -> None:
    tx.execute("INSERT INTO model_version_events (id, model, ts, action, label, previous, canary_percent, reason) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (secrets.token_hex(12), model, now, action, label, previous, canary_percent,
                                                    reason))


def _next_label(tx: Tx, model: str) -> str:
    numbers = [int(m[1]) for (label,) in tx.fetchall("SELECT label FROM model_versions WHERE model = ?", (model,))
               if (m := _AUTO_LABEL.match(label))]
    return f"v{max(numbers, default=0) + 1}"


def ensure_version(tx: Tx, model: str, specs: list, now: float, label: str | None = None) -> Version:
    """The group's version with these specs: the existing one of the same hash, else a new one."""
    digest = spec_hash(specs)
    row = tx.fetchone("SELECT model, label, spec_hash, spec, created FROM model_versions WHERE model = ? AND "
                      "spec_hash = ?", (model, digest))
    if row is not None:
        found = _version(row)
        if label is not None and label != found.label:
            raise VersionError(409, f"this spec is already version {found.label!r} of {model!r}", "label")
        return found
    if label is None:
        label = _next_label(tx, model)
    elif not LABEL.match(label) or _AUTO_LABEL.match(label):
        raise VersionError(400, f"a label is 1-64 letters, digits, '_', '.' or '-', and not v<number> (those are "
                           f"given in order): {label[:64]!r}", "label")
    elif version(tx, model, label) is not None:
        raise VersionError(409, f"{model!r} already has a version {label!r} with another spec", "label")
    tx.execute("INSERT INTO model_versions (model, label, spec_hash, spec, created) VALUES (?, ?, ?, ?, ?)",
               (model, label, digest, canonical(specs), now))
    return Version(model, label, digest, tuple(specs), now)


def change(tx: Tx, current: Rollout, now: float, *, action: str, stable: str, canary: str | None = None,
           canary_percent: float = 0.0, label: str | None = None, previous: str | None = None,
           reason: str | None = None, config_hash: str | None = None) -> Rollout:
    """Write a new rollout for `current.model` if nobody changed it since `current` was read; VersionError 409
    otherwise. The event names the version acted on (`label`) and the one it replaced (`previous`)."""
    tx.lock(_LOCK)
    if current.generation == 0 and rollout(tx, current.model) is not None:
        raise VersionError(409, f"the versions of {current.model!r} changed meanwhile; look again and retry")
    generation = current.generation + 1
    values = (stable, canary, canary_percent if canary else 0.0, config_hash or current.config_hash, generation, now)
    if current.generation == 0:
        tx.execute("INSERT INTO model_rollouts (stable, canary, canary_percent, config_hash, generation, updated, "
                   "model) VALUES (?, ?, ?, ?, ?, ?, ?)", (*values, current.model))
    elif not tx.execute("UPDATE model_rollouts SET stable = ?, canary = ?, canary_percent = ?, config_hash = ?, "
                        "generation = ?, updated = ? WHERE model = ? AND generation = ?",
                        (*values, current.model, current.generation)):
        raise VersionError(409, f"the versions of {current.model!r} changed meanwhile; look again and retry")
    event(tx, current.model, action, now, label=label, previous=previous,
          canary_percent=canary_percent if canary else None, reason=reason)
    return Rollout(current.model, stable, canary, canary_percent if canary else 0.0, generation,
                   config_hash or current.config_hash)


def config_plan(tx: Tx, config: GatewayConfig, now: float) -> dict[str, tuple[Rollout | None, Version, bool]]:
    """Per config group: its rollout (None: a group never seen), the version its config's deployments are
    (made if new), and whether the config changed since it was last applied, so that version must become
    stable. Nothing is served differently until `change` writes it, after the version loaded."""
    tx.lock(_LOCK)
    out = {}
    for g in config.models:
        specs = group_specs(g)
        current = rollout(tx, g.name)
        v = ensure_version(tx, g.name, specs, now)
        out[g.name] = (current, v, current is None or current.config_hash != v.spec_hash)
    return out
