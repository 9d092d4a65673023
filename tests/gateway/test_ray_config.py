"""`provider: ray` in the config: what is accepted, what is refused and how, and what replicas cost.

These run without a cluster (and without Ray): the config is validated before
anything starts.
"""

from __future__ import annotations

import sys

import pytest

from inferd.gateway.build import version_specs
from inferd.gateway.config import RaySpec, parse_config, parse_deployments, replica_name, replica_of
from inferd.providers.ray_actor import RAY_MISSING, import_ray
from inferd.tenancy.prices import PriceBook


def config(**deployment) -> dict:
    return {"models": [{"name": "chat", "deployments": [{"provider": "ray", "name": "chat-ray", **deployment}]}]}


def test_a_ray_deployment_defaults_to_a_fixed_count_of_one_cpu_replicas():
    spec = parse_config(config(replicas=3, address="auto")).models[0].deployments[0]
    assert isinstance(spec, RaySpec)
    assert (spec.replicas, spec.min_replicas, spec.max_replicas) == (3, 3, 3)
    assert (spec.num_cpus, spec.num_gpus, spec.address) == (1.0, 0.0, "auto")


@pytest.mark.parametrize("deployment, message", [
    ({"replicas": 2, "min_replicas": 3, "max_replicas": 4}, "min_replicas <= replicas <= max_replicas"),
    ({"replicas": 0}, "replicas"),
    ({"num_cpus": 0}, "num_cpus"),
    ({"task": "embed"}, "task"),                       # replicas serve generation only
    ({"autoscale": {"target_queue": -1}}, "target_queue"),
    ({"placement_group": "x"}, "placement_group"),      # unknown options are refused, never ignored
    ({"address": "ray://head:10001"}, "Ray Client"),
])
def test_bad_ray_options_are_refused_naming_the_key(deployment, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_config(config(**deployment))
    assert "models[0].deployments[0]" in str(e.value)


def test_every_ray_deployment_names_the_same_cluster():
    data = {"models": [{"name": "a", "deployments": [{"provider": "ray", "address": "10.0.0.1:6379"}]},
                       {"name": "b", "deployments": [{"provider": "ray", "address": "10.0.0.2:6379"}]}]}
    with pytest.raises(ValueError, match="same address"):
        parse_config(data)


def test_names_like_a_replica_are_reserved():
    data = {"models": [{"name": "a", "deployments": [{"provider": "local", "name": "a#1"}]}]}
    with pytest.raises(ValueError, match="replica"):
        parse_config(data)


def test_replicas_cost_what_their_deployment_costs():
    book = PriceBook.from_config(parse_config(config(price={"input": 1.0, "output": 2.0})))
    assert replica_of(replica_name("chat-ray", 7)) == "chat-ray"
    assert book.price("chat-ray#7").input == 1.0 and book.price("chat-ray#7").output == 2.0
    assert book.price("elsewhere#7").input == 0.0


def test_without_ray_installed_a_ray_deployment_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ValueError, match="pip install 'inferd\\[ray\\]'") as e:
        import_ray()
    assert str(e.value) == RAY_MISSING



def test_a_versions_unnamed_ray_and_local_deployments_get_names_of_their_own():
    specs = parse_deployments([{"provider": "ray"}, {"provider": "local"}])
    assert [s.name for s in version_specs("chat", "v2", specs)] == ["chat/0@v2", "chat/1@v2"]
    assert [s.name for s in version_specs("chat", "v1", specs)] == ["chat/0", "chat/1"]
