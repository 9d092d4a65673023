"""Versions and rollouts in the store, on SQLite and PostgreSQL: labels, hashes, conditional changes."""

from __future__ import annotations

import pytest

from inferd.gateway import version_store as vs
from inferd.gateway.config import parse_config, parse_deployments

CONFIG = {"models": [{"name": "chat", "price": {"input": 1, "output": 2},
                      "deployments": [{"provider": "openai", "base_url": "http://x/v1", "model": "m"}]}]}


def test_the_config_seeds_v1_and_a_changed_config_makes_a_new_version(store):
    plan = store.run_sync(lambda tx: vs.config_plan(tx, parse_config(CONFIG), 1.0))
    current, v1, changed = plan["chat"]
    assert current is None and v1.label == "v1" and changed
    assert v1.specs[0].price.input == 1  # the group's price travels with the version
    store.run_sync(lambda tx: vs.change(tx, vs.Rollout("chat", "v1"), 2.0, action="config", stable="v1",
                                        label="v1", config_hash=v1.spec_hash))
    again = store.run_sync(lambda tx: vs.config_plan(tx, parse_config(CONFIG), 3.0))["chat"]
    assert again[1] == v1 and not again[2]
    other = {"models": [{**CONFIG["models"][0], "routing": "lowest_cost"}]}  # settings are not a version
    assert not store.run_sync(lambda tx: vs.config_plan(tx, parse_config(other), 3.0))["chat"][2]
    moved = {"models": [{**CONFIG["models"][0], "deployments": [{**CONFIG["models"][0]["deployments"][0],
                                                                 "model": "m2"}]}]}
    current, v2, changed = store.run_sync(lambda tx: vs.config_plan(tx, parse_config(moved), 4.0))["chat"]
    assert current.stable == "v1" and v2.label == "v2" and changed


def test_a_spec_is_one_version_whatever_it_is_deployed_as(store):
    specs = parse_deployments({"provider": "local", "model": "a.gguf"})
    first = store.run_sync(lambda tx: vs.ensure_version(tx, "chat", specs, 1.0, "q4"))
    assert store.run_sync(lambda tx: vs.ensure_version(tx, "chat", specs, 2.0)) == first
    with pytest.raises(vs.VersionError) as e:
        store.run_sync(lambda tx: vs.ensure_version(tx, "chat", specs, 2.0, "other"))
    assert e.value.status == 409
    with pytest.raises(vs.VersionError) as e:
        store.run_sync(lambda tx: vs.ensure_version(tx, "chat", parse_deployments([{"provider": "local"}]), 2.0,
                                                    "v7"))
    assert e.value.status == 400  # v<number> labels are given in order, not chosen


def test_a_change_computed_from_a_stale_rollout_is_refused(store):
    r1 = store.run_sync(lambda tx: vs.change(tx, vs.Rollout("chat", "v1"), 1.0, action="config", stable="v1"))
    r2 = store.run_sync(lambda tx: vs.change(tx, r1, 2.0, action="deploy", stable="v1", canary="v2",
                                             canary_percent=20, label="v2"))
    assert (r2.canary, r2.canary_percent, r2.generation) == ("v2", 20, 2)
    with pytest.raises(vs.VersionError) as e:
        store.run_sync(lambda tx: vs.change(tx, r1, 3.0, action="promote", stable="v3"))
    assert e.value.status == 409
    with pytest.raises(vs.VersionError):  # a second first write, as two replicas starting at once would make
        store.run_sync(lambda tx: vs.change(tx, vs.Rollout("chat", "v9"), 3.0, action="config", stable="v9"))
    assert store.run_sync(lambda tx: vs.rollout(tx, "chat")) == r2
    r3 = store.run_sync(lambda tx: vs.change(tx, r2, 4.0, action="promote", stable="v2", label="v2", previous="v1"))
    assert store.run_sync(lambda tx: vs.previous_stable(tx, "chat", r3.stable)) == "v1"
    assert [e["action"] for e in store.run_sync(lambda tx: vs.history(tx, "chat"))] == ["promote", "deploy", "config"]
