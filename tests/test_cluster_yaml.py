"""cluster.yaml passes Ray's own (offline) cluster-config schema validation."""
from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def cluster_config():
    return yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    """What ``ray up`` does before it touches the cloud: fill Ray's defaults, then schema-validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)                                # raises on any schema violation
    return prepared


def test_cluster_yaml_passes_ray_schema_validation(cluster_config):
    prepared = _validate(cluster_config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 8


def test_validation_is_not_vacuous(cluster_config):
    import jsonschema

    bad = copy.deepcopy(cluster_config)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    with pytest.raises((jsonschema.ValidationError, ValueError, TypeError)):
        _validate(bad)
    bad = copy.deepcopy(cluster_config)
    bad["available_node_types"]["gpu_worker"]["unknown_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)


def test_setup_installs_this_package_and_workers_are_gpu_nodes(cluster_config):
    setup = " ".join(cluster_config["setup_commands"])
    assert "pip install" in setup and "/home/ubuntu/rfclip" in setup
    assert cluster_config["file_mounts"]["/home/ubuntu/rfclip"] == "."
    assert cluster_config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
