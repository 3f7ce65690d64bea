"""Byzantine-robust rules: hand-computed results, properties, and attacks."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import fedhive as fl
from fedhive.common import ConfigError, FitRes, Status, ndarrays_to_parameters
from fedhive.common import parameters_to_ndarrays as to_arrays
from fedhive.server import RoundCallback, ServerConfig
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from fedhive.server.strategy.robust import pairwise_sq_distances
from fedhive.simulation import start_simulation


def aggregate(strategy, replies, global_arrays=None):
    """``replies``: (client id, arrays) pairs, one example each."""
    global_arrays = global_arrays or [np.zeros_like(a) for a in replies[0][1]]
    aggregator = strategy.fit_aggregator(1, ndarrays_to_parameters(global_arrays))
    for cid, arrays in replies:
        aggregator.add(ClientProxy(cid), FitRes(Status(), ndarrays_to_parameters(arrays), 1, {}))
    new, _ = aggregator.finalize()
    return to_arrays(new)


def scalars(values, ids=None):
    ids = ids or [str(i) for i in range(len(values))]
    return [(cid, [np.array([float(v)])]) for cid, v in zip(ids, values, strict=True)]


def value(strategy, values, ids=None) -> float:
    return float(aggregate(strategy, scalars(values, ids))[0][0])


# -- hand-computed ----------------------------------------------------------------------------


def test_median_by_hand():
    assert value(FedMedian(), [1, 5, 2]) == 2.0
    assert value(FedMedian(), [1, 2, 3, 10]) == 2.5
    new = aggregate(FedMedian(), [("a", [np.array([[1.0, 9.0]])]), ("b", [np.array([[3.0, 0.0]])])])
    np.testing.assert_array_equal(new[0], [[2.0, 4.5]])


def test_trimmed_mean_by_hand():
    assert value(FedTrimmedAvg(), [-100, 1, 2, 3, 100]) == 2.0  # beta 0.2: cut 1 each end
    assert value(FedTrimmedAvg(beta=0.25), [0, 1, 2, 30]) == 1.5
    assert value(FedTrimmedAvg(beta=0.1), [0, 1, 2, 30]) == 8.25  # int(0.4) = 0 cut


def test_krum_by_hand_with_ties_broken_by_client_id():
    # f = 1, n = 5: 2 neighbours. Scores: 0 -> 5, 1 -> 2, 2 -> 2, 3 -> 5, 100 -> huge.
    assert value(Krum(num_malicious_clients=1), [0, 1, 2, 3, 100]) == 1.0
    swapped = ["0", "2", "1", "3", "4"]  # the value 2 now has the smaller id
    assert value(Krum(num_malicious_clients=1), [0, 1, 2, 3, 100], swapped) == 2.0
    # Multi-Krum keeps 1 and 2, then 0 beats 3 on the id tie
    assert value(Krum(num_malicious_clients=1, num_clients_to_keep=3), [0, 1, 2, 3, 100]) == 1.0
    assert value(MultiKrum(num_malicious_clients=1), [0, 1, 2, 3, 100]) == 1.5  # m = n - f


def test_bulyan_by_hand():
    # f = 1, n = 7: theta = 5 selected by repeated Krum: 2, 1 (tie with 3), 3, 0 (tie with
    # 4), 4 (tie with 50). Per coordinate, the beta = 3 values nearest the median 2: 1, 2, 3.
    assert value(Bulyan(num_malicious_clients=1), [0, 1, 2, 3, 4, 50, -50]) == 2.0
    # without the outliers' influence, f = 0 keeps everything: mean of the 3 nearest the median
    assert value(Bulyan(), [0, 1, 2.5]) == pytest.approx(3.5 / 3)


def test_bulyan_with_multi_krum_selection_by_hand():
    # to_keep = 2: step 1 averages the two best (2 and 1, on the id tie) = 1.5 and picks the
    # model nearest 1.5 (1 and 2 tie; id "1" wins). The rest is as above.
    assert value(Bulyan(num_malicious_clients=1, to_keep=2), [0, 1, 2, 3, 4, 50, -50]) == 2.0


def test_overflowing_distances_just_mean_far_away():
    values = [0, 1, 2, 3, 4, 5, 1e300]
    for s in (Krum(num_malicious_clients=1), MultiKrum(num_malicious_clients=1)):
        assert value(s, values) < 5
    # selects 2, 3, 1, 4, 0 (ties to the smaller id); the 3 nearest the median 2: 1, 2, 3
    assert value(Bulyan(num_malicious_clients=1), values) == 2.0


def test_pairwise_distances_span_all_layers():
    ups = [[np.array([0.0]), np.array([[0.0, 0.0]])], [np.array([1.0]), np.array([[2.0, 2.0]])]]
    np.testing.assert_array_equal(pairwise_sq_distances(ups), [[0, 9], [9, 0]])


def test_too_few_results_for_the_number_of_malicious_clients(caplog):
    # Krum follows Flower: max(1, n - f - 2) neighbours, and a warning
    with caplog.at_level("WARNING", logger="fedhive"):
        # one neighbour each: 0 -> 4, 2 -> 1, 3 -> 1, 10 -> 49; the tie goes to id "1"
        assert value(Krum(num_malicious_clients=1), [0, 2, 3, 10]) == 2.0
    assert "assumes at least 5 results, got 4" in caplog.text
    with pytest.raises(ConfigError, match=r"at least 7 results .* got 6"):
        value(Bulyan(num_malicious_clients=1), [0, 1, 2, 3, 4, 5])
    with pytest.raises(ConfigError, match="num_clients_to_keep=9"):
        value(MultiKrum(num_clients_to_keep=9), [0, 1, 2, 3])


def test_results_keep_the_model_dtype():
    replies = [(str(i), [np.full(3, i, np.float32)]) for i in range(7)]
    for s in (
        FedMedian(),
        FedTrimmedAvg(),
        Krum(num_malicious_clients=1),
        Bulyan(num_malicious_clients=1),
    ):
        assert aggregate(s, replies)[0].dtype == np.float32


# -- properties -----------------------------------------------------------------------------

RULES = {
    "median": FedMedian,
    "trimmed": lambda: FedTrimmedAvg(beta=0.2),
    "krum": lambda: Krum(num_malicious_clients=1),
    "multikrum": lambda: MultiKrum(num_malicious_clients=1),
    "bulyan": lambda: Bulyan(num_malicious_clients=1),
    "bulyan-multi": lambda: Bulyan(num_malicious_clients=1, to_keep=3),
}

updates = st.integers(7, 9).flatmap(
    lambda n: st.lists(
        st.lists(st.floats(-1e3, 1e3, allow_subnormal=False), min_size=4, max_size=4),
        min_size=n,
        max_size=n,
    )
)


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=25, deadline=None)
@given(updates, st.randoms(use_true_random=False))
def test_robust_rules_ignore_arrival_order(name, rows, rand):
    replies = [(f"c{i}", [np.array(r[:2]), np.array(r[2:])]) for i, r in enumerate(rows)]
    shuffled = list(replies)
    rand.shuffle(shuffled)
    a = aggregate(RULES[name](), replies)
    b = aggregate(RULES[name](), shuffled)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), st.integers(7, 9))
def test_identical_updates_are_returned_unchanged(name, row, n):
    replies = [(str(i), [np.array(row)]) for i in range(n)]
    np.testing.assert_allclose(aggregate(RULES[name](), replies)[0], row, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(updates)
def test_equal_weight_reductions_agree_with_fedavg(rows):
    replies = [(str(i), [np.array(r)]) for i, r in enumerate(rows)]
    mean = aggregate(FedAvg(), replies)[0]  # every reply has one example
    for s in (FedTrimmedAvg(beta=0.0), MultiKrum(num_clients_to_keep=len(rows))):
        np.testing.assert_allclose(aggregate(s, replies)[0], mean, rtol=1e-9, atol=1e-9)


# -- Byzantine clients ------------------------------------------------------------------------

HONEST_MEAN = np.array([1.0, -2.0, 0.5, 3.0])


def attack(kind: str, honest: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    if kind == "huge":
        return np.full(4, 1e6)
    if kind == "random":
        return rng.normal(0.0, 100.0, size=4)
    return -10.0 * np.mean(honest, axis=0)  # sign flipped and scaled


ROBUST = {
    "median": FedMedian,
    "trimmed": lambda: FedTrimmedAvg(beta=0.2),
    "krum": lambda: Krum(num_malicious_clients=2),
    "multikrum": lambda: MultiKrum(num_malicious_clients=2),
    "bulyan": lambda: Bulyan(num_malicious_clients=2),
}


@pytest.mark.parametrize("kind", ["huge", "random", "sign-flip"])
def test_robust_rules_keep_near_the_honest_mean_under_attack(kind):
    rng = np.random.default_rng(4)
    n, f = 11, 2
    honest = [HONEST_MEAN + rng.normal(0, 0.1, size=4) for _ in range(n - f)]
    byzantine = [attack(kind, honest, rng) for _ in range(f)]
    replies = [(f"{i:02d}", [u]) for i, u in enumerate(byzantine + honest)]
    broken = aggregate(FedAvg(), replies)[0]
    assert np.abs(broken - HONEST_MEAN).max() > 5.0
    for name, make in ROBUST.items():
        robust = aggregate(make(), replies)[0]
        assert np.abs(robust - HONEST_MEAN).max() < 0.3, (name, robust)


def byzantine_client_fn(context):
    """Honest clients move halfway to a target; the first two send huge updates."""
    pid = int(context.node_config["partition-id"])

    class Client(fl.client.NumPyClient):
        def fit(self, parameters, config):
            if pid < 2:
                return [np.full_like(parameters[0], 1e6)], 100, {}
            noise = np.random.default_rng(pid).normal(0, 0.01, size=parameters[0].shape)
            return [parameters[0] + 0.5 * (HONEST_MEAN - parameters[0]) + noise], 1, {}

    return Client()


@pytest.mark.parametrize("make", [lambda: Krum(num_malicious_clients=2), FedMedian])
def test_robust_strategy_in_simulation_converges_despite_attackers(make):
    strategy = make()
    strategy.sampling.fraction_evaluate = 0.0
    strategy.sampling.initial_parameters = ndarrays_to_parameters([np.zeros(4)])
    final = []

    class Grab(RoundCallback):
        def on_run_end(self, engine, history):
            final.extend(to_arrays(engine.parameters))

    start_simulation(
        client_fn=byzantine_client_fn,
        num_clients=9,
        config=ServerConfig(num_rounds=6),
        strategy=strategy,
        seed=1,
        callbacks=[Grab()],
    )
    np.testing.assert_allclose(final[0], HONEST_MEAN, atol=0.1)


def test_bulyan_takes_flowers_first_aggregation_rule():
    calls = []

    def coordinate_median(results, num_malicious_clients, scale=1.0):
        calls.append((len(results), num_malicious_clients, scale))
        return [np.median(np.stack([r[0][0] for r in results]), axis=0) * scale]

    strategy = Bulyan(num_malicious_clients=1, first_aggregation_rule=coordinate_median, scale=1.0)
    assert value(strategy, [0, 1, 2, 3, 4, 50, -50]) == 2.0
    assert calls[0] == (7, 1, 1.0) and len(calls) == 5  # theta = n - 2f selections
    with pytest.raises(TypeError, match="scale"):
        Bulyan(num_malicious_clients=1, scale=2.0)
