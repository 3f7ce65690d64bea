"""The feature examples under examples/features run with tiny settings and show what they
claim: a CNN learns, top-k sends fewer bytes, FedBuff beats the stragglers' clock,
personal models beat the global one on skewed clients, DP noise is added under SecAgg+."""

from __future__ import annotations

import importlib
import sys

import pytest

from deploy_helpers import ROOT

FEATURES = ROOT / "examples" / "features"
TINY = ["--num-clients", "4", "--rounds", "3"]


@pytest.fixture
def example():
    """Import an example by name from examples/features (forgotten afterwards)."""
    path, before = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(FEATURES))
    yield importlib.import_module
    sys.path[:] = path
    for name in set(sys.modules) - before:
        module = sys.modules[name]
        if str(getattr(module, "__file__", "") or "").startswith(str(FEATURES)):
            del sys.modules[name]


def test_every_feature_example_is_listed_in_the_readme():
    readme = (ROOT / "examples" / "README.md").read_text()
    for path in sorted(FEATURES.glob("[!_]*.py")):
        assert f"examples/features/{path.name}" in readme, path.name


def test_pytorch_cnn_learns(example):
    history = example("pytorch_cnn").main(["--num-clients", "4", "--rounds", "2"])
    accuracy = [a for _, a in history.metrics_centralized["accuracy"]]
    assert len(accuracy) == 3  # round 0 and two rounds
    assert accuracy[-1] > accuracy[0] + 0.2


def test_compression_sends_fewer_bytes_and_still_learns(example):
    runs = example("compression").main([*TINY, "--ratio", "0.1"])
    plain, sparse = runs["none"], runs["top-k 0.1"]
    assert sparse.bytes_totals()["bytes_up"] < 0.35 * plain.bytes_totals()["bytes_up"]
    for history in (plain, sparse):
        assert history.metrics_centralized["accuracy"][-1][1] > 0.3


def test_fedbuff_publishes_models_sooner_than_synchronous_rounds(example):
    runs = example("fedbuff_stragglers").main(["--num-clients", "8", "--rounds", "3"])
    sync, fedbuff = runs["FedAvg (sync)"], runs["FedBuff"]
    assert [r["round"] for r in fedbuff.rounds[1:]] == list(range(1, 10))
    # three versions of FedBuff come long before three rounds that wait for stragglers
    assert fedbuff.rounds[3]["virtual_time_s"] < sync.rounds[3]["virtual_time_s"]
    assert fedbuff.metrics_centralized["accuracy"][-1][1] > 0.3


def test_personal_models_beat_the_global_one_on_skewed_clients(example):
    history = example("personalization").main(TINY)
    last = history.rounds[-1]
    assert last["personalized"]["mean"] > last["global"]["mean"] + 0.1


def test_dp_with_secure_aggregation_masks_clips_and_spends_epsilon(example):
    history = example("dp_secagg").main(TINY)
    epsilon = [e for _, e in history.metrics_distributed_fit["epsilon"]]
    assert len(epsilon) == 3 and 0 < epsilon[0] < epsilon[1] < epsilon[2] < float("inf")
    for record in history.rounds[1:]:
        fit = record["fit"]
        assert fit["secagg"]["after_unmask"] == fit["num_results"] >= 2  # summed masked
        assert fit["metrics"]["dp_noise_stddev"] > 0
