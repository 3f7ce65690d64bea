"""The ``[simulation]`` table's Ray keys: client_resources and ray_init_args."""

from __future__ import annotations

import pytest

from fedhive.cli.config import validate
from fedhive.common.errors import ConfigError


def test_ray_keys_are_read_and_checked():
    cfg = validate(
        {
            "simulation": {
                "backend": "ray",
                "client_resources": {"num_cpus": 1, "num_gpus": 0.25},
                "ray_init_args": {"address": "127.0.0.1:6379"},
            }
        }
    ).simulation
    assert cfg.backend == "ray"
    assert cfg.client_resources == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert cfg.ray_init_args == {"address": "127.0.0.1:6379"}
    with pytest.raises(ConfigError, match="client_resources"):
        validate({"simulation": {"client_resources": {"cores": 2}}}, "exp.toml")
    assert validate({}).simulation.client_resources == {}
