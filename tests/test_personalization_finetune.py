"""Fine-tuning in two stages (LP-FT): the head alone first, then every layer."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedhive.cli.personalization import PersonalizationSection  # noqa: E402
from fedhive.common.errors import ConfigError  # noqa: E402
from fedhive.models.torch_models import CNN1D, get_weights  # noqa: E402
from fedhive.personalization import PersonalizationConfig, PersonalizedTorchClient  # noqa: E402

FIT = {"local_epochs": 1, "batch_size": 10, "lr": 0.1, "momentum": 0.0}


def _client(config: PersonalizationConfig) -> PersonalizedTorchClient:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(2, 40))
    y = rng.integers(0, 2, 60)
    x = (centres[y] + rng.normal(size=(60, 40))).astype(np.float32)
    model = CNN1D(10, length=40, channels=4, seed=0)
    return PersonalizedTorchClient(model, config, train=(x[:40], y[:40]), test=(x[40:], y[40:]))


def _changed(client: PersonalizedTorchClient, config: PersonalizationConfig) -> set[str]:
    """The names of the arrays fine-tuning changed."""
    model = CNN1D(10, length=40, channels=4, seed=0)
    names = list(model.state_dict())
    before = get_weights(model)
    after = client.personal_model(client.get_parameters({}), FIT)
    return {n for n, a, b in zip(names, before, after, strict=True) if not np.array_equal(a, b)}


def test_head_epochs_alone_train_only_the_head():
    config = PersonalizationConfig(
        method="finetune", finetune_epochs=0, finetune_head=("head",), finetune_head_epochs=3
    )
    client = _client(config)
    assert client.finetune_head == {"head.weight", "head.bias"}
    assert _changed(client, config) == {"head.weight", "head.bias"}


def test_head_first_then_every_layer():
    lpft = PersonalizationConfig(
        method="finetune", finetune_epochs=2, finetune_head=("head",), finetune_head_epochs=3
    )
    changed = _changed(_client(lpft), lpft)
    assert {"head.weight", "head.bias"} < changed
    assert any(not n.startswith("head") for n in changed)
    plain = PersonalizationConfig(method="finetune", finetune_epochs=2)
    a = _client(lpft).personal_model(_client(lpft).get_parameters({}), FIT)
    b = _client(plain).personal_model(_client(plain).get_parameters({}), FIT)
    assert not all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "finetune", "finetune_head_epochs": 2}, "go together"),
        ({"method": "finetune", "finetune_head": ("head",)}, "go together"),
        ({"method": "fedper", "personal_layers": ("head",), "finetune_head_epochs": 2}, "only"),
        ({"method": "finetune", "finetune_head": "head", "finetune_head_epochs": 2}, "list"),
        ({"method": "finetune", "finetune_head": ("head",), "finetune_head_epochs": -1}, ">= 0"),
    ],
)
def test_bad_head_first_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PersonalizationConfig(**kwargs)


def test_a_head_pattern_that_matches_nothing_is_refused():
    config = PersonalizationConfig(
        method="finetune", finetune_head=("classifier",), finetune_head_epochs=1
    )
    with pytest.raises(ConfigError, match="classifier"):
        _client(config)


def test_the_toml_table_takes_the_head_first_keys():
    section = PersonalizationSection(
        method="finetune", finetune_epochs=5, finetune_head=["head"], finetune_head_epochs=2
    )
    assert section.options() == PersonalizationConfig(
        method="finetune", finetune_epochs=5, finetune_head=("head",), finetune_head_epochs=2
    )
    with pytest.raises(ValueError, match="go together"):
        PersonalizationSection(method="finetune", finetune_head_epochs=2)


def test_the_benchmark_refuses_a_fine_tuning_longer_than_local_only():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "personalization.py"), "--quick",
         "--methods", "local only,FedAvg + LP-FT (5 head + 15 epochs)"],
        capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, PYTHONPATH=str(root / "src")),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "same local budget" in proc.stderr and "LP-FT" in proc.stderr
