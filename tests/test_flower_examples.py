"""The Flower-pattern examples in examples/flower run with fedhive and learn.

Each follows one of Flower's legacy-API example apps (quickstart-pytorch,
quickstart-tensorflow with Keras 3, sklearn-logreg-mnist, simulation-pytorch, the e2e
strategies and e2e-bare apps) on local stand-in data; see docs/flower_compatibility.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from deploy_helpers import ROOT

FLOWER = ROOT / "examples" / "flower"


@pytest.fixture(autouse=True)
def _on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FLOWER))
    yield
    for name in list(sys.modules):
        if name in {"_data", "quickstart_pytorch", "quickstart_tensorflow", "sklearn_logreg",
                    "simulation_pytorch", "e2e_strategies", "e2e_bare"}:  # fmt: skip
            del sys.modules[name]


def example(name: str):
    return importlib.import_module(name)


def test_e2e_bare_converges_on_a_bare_array():
    history = example("e2e_bare").main(rounds=3)
    assert [round(loss, 6) for _, loss in history.losses_distributed] == [4.0, 1.0, 0.25]


def test_sklearn_logreg_learns():
    history = example("sklearn_logreg").main(rounds=2)
    assert history.metrics_centralized["accuracy"][-1][1] > 0.6


@pytest.mark.slow
def test_quickstart_pytorch_learns():
    history = example("quickstart_pytorch").main(rounds=2)
    assert history.metrics_distributed["accuracy"][-1][1] > 0.6


@pytest.mark.slow
def test_simulation_pytorch_learns():
    history = example("simulation_pytorch").main(num_clients=10, rounds=3)
    accuracy = [acc for _, acc in history.metrics_centralized["accuracy"]]
    assert accuracy[-1] > accuracy[0]
    assert history.metrics_distributed_fit["examples"][-1][1] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs fedhive[keras]")
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras, not us
def test_quickstart_tensorflow_keras3_learns():
    history = example("quickstart_tensorflow").main(rounds=2)
    losses = [loss for _, loss in history.losses_distributed]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_every_flower_strategy_runs_the_e2e_app():
    losses = example("e2e_strategies").main(rounds=2)
    assert len(losses) == 13
    for name, by_round in losses.items():
        assert len(by_round) == 2 and by_round[-1] < by_round[0], name
