"""Flower compatibility, numbers: under Flower's names, Flower's results.

Each expected value is computed here from the formula Flower documents and implements
(its strategies' ``aggregate_fit``), written independently, or is a value from Flower's
own unit tests; the paper variants stay available behind an option.
"""

from __future__ import annotations

import logging
from unittest.mock import MagicMock

import numpy as np
import pytest

from fedhive.common import (
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy import (
    Bulyan,
    FaultTolerantFedAvg,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)


def res(values, n: int = 5, **metrics) -> FitRes:
    return FitRes(Status(), ndarrays_to_parameters([np.asarray(values, np.float32)]), n, metrics)


def rows(*values: float, n: int = 5) -> list[tuple[ClientProxy, FitRes]]:
    return [(ClientProxy(str(i)), res([v] * 4, n)) for i, v in enumerate(values)]


def only(params: Parameters | None) -> np.ndarray:
    assert params is not None
    (arr,) = parameters_to_ndarrays(params)
    return arr


# -- adaptive optimizers: three rounds against Flower's update rule --------------------------

X0 = np.array([0.5, -1.0, 2.0, 0.0])
TARGETS = [np.array([1.5, -1.0, 1.0, 0.3]), np.array([1.0, 0.5, 1.5, -0.2]), np.array([0.2] * 4)]


def flower_adaptive(kind: str, eta, b1, b2, tau, rounds: int) -> list[np.ndarray]:
    """Flower's FedAdam/FedYogi/FedAdagrad: m and v start at 0; FedAdam scales eta by
    sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) with t the round; each round's mean is TARGETS[t]."""
    x, m, v, out = X0.copy(), np.zeros(4), np.zeros(4), []
    for t in range(1, rounds + 1):
        d = TARGETS[t - 1] - x
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d * d
            step = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        elif kind == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
            step = eta
        else:
            v = v + d * d
            step = eta
        x = x + step * m / (np.sqrt(v) + tau)
        out.append(x)
    return out


def run_rounds(strategy, rounds: int = 3) -> list[np.ndarray]:
    out = []
    for t in range(1, rounds + 1):
        params, _ = strategy.aggregate_fit(t, [(MagicMock(), res(TARGETS[t - 1], 3))], [])
        out.append(only(params).astype(np.float64))
    return out


def initial():
    return ndarrays_to_parameters([X0.astype(np.float64)])


@pytest.mark.parametrize(
    ("make", "kind", "hyper"),
    [
        (
            lambda: FedAdam(initial_parameters=initial(), eta=0.1, tau=1e-3),
            "adam",
            (0.1, 0.9, 0.99, 1e-3),
        ),
        (lambda: FedYogi(initial_parameters=initial()), "yogi", (1e-2, 0.9, 0.99, 1e-3)),
        (
            lambda: FedAdagrad(initial_parameters=initial(), tau=1e-3),
            "adagrad",
            (0.1, 0.0, 0.0, 1e-3),
        ),
    ],
)
def test_adaptive_strategies_give_flowers_numbers_over_three_rounds(make, kind, hyper):
    expected = flower_adaptive(kind, *hyper, rounds=3)
    for got, want in zip(run_rounds(make()), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_same_rounds_through_the_engine_path_agree():
    # fit_aggregator (what the engine uses) and aggregate_fit (Flower's list API) agree
    direct = run_rounds(FedAdam(initial_parameters=initial(), tau=1e-3))
    s = FedAdam(initial_parameters=initial(), tau=1e-3)
    model = initial()
    for t in range(1, 4):
        agg = s.fit_aggregator(t, model)
        agg.add(ClientProxy("0"), res(TARGETS[t - 1], 3))
        model, _ = agg.finalize()
        np.testing.assert_allclose(only(model), direct[t - 1], rtol=1e-12)


def test_flowers_fedadagrad_unit_value():
    # Flower's own test: x0 = 0.1, clients at 0.2 and 1.0 (5 examples each), eta 0.1, tau 0.5
    s = FedAdagrad(eta=0.1, eta_l=0.316, tau=0.5, initial_parameters=ndarrays_to_parameters(
        [np.full(4, 0.1, np.float32)]))  # fmt: skip
    params, _ = s.aggregate_fit(1, rows(0.2, 1.0), [])
    assert (only(params) == np.float32(0.15)).all()


def test_paper_variants_stay_behind_an_option():
    paper = FedAdam(initial_parameters=initial(), eta=0.1, tau=1e-3, variant="paper")
    got = run_rounds(paper, 1)[0]
    d = TARGETS[0] - X0
    v = 0.99 * 1e-6 + 0.01 * d * d  # v starts at tau^2, no bias correction
    np.testing.assert_allclose(got, X0 + 0.1 * 0.1 * d / (np.sqrt(v) + 1e-3), rtol=1e-6)
    no_correction = FedAdam(initial_parameters=initial(), eta=0.1, tau=1e-3, bias_correction=False)
    got = run_rounds(no_correction, 1)[0]
    np.testing.assert_allclose(got, X0 + 0.1 * 0.1 * d / (np.sqrt(0.01 * d * d) + 1e-3), rtol=1e-6)
    with pytest.raises(Exception, match="variant"):
        FedYogi(initial_parameters=initial(), variant="adam")


def test_fedavgm_near_one_learning_rate_and_near_zero_momentum_is_the_mean():
    # Flower's test: two clients (1 and 2 examples) with the same weights, two rounds
    w = [np.array([[1, 2, 3], [4, 5, 6]], np.float32), np.array([7, 8, 9, 10], np.float32)]
    zeros = [np.zeros_like(a) for a in w]
    results = [(MagicMock(), FitRes(Status(), ndarrays_to_parameters(w), n, {})) for n in (1, 2)]
    s = FedAvgM(
        initial_parameters=ndarrays_to_parameters(zeros),
        server_learning_rate=1.0 + 1e-9,
        server_momentum=1e-9,
    )
    s.aggregate_fit(1, results, [])
    params, _ = s.aggregate_fit(2, results, [])
    for got, want in zip(parameters_to_ndarrays(params), w, strict=True):
        np.testing.assert_almost_equal(got, want)


# -- Krum and Multi-Krum ---------------------------------------------------------------------


def test_krum_with_fewer_than_2f_plus_3_results_follows_flower_and_warns(caplog):
    s = Krum(num_malicious_clients=1, initial_parameters=ndarrays_to_parameters([np.full(4, 0.1)]))
    with caplog.at_level(logging.WARNING, logger="fedhive"):
        params, _ = s.aggregate_fit(1, rows(0.2, 0.7, 1.0), [])
    assert (only(params) == np.float32(0.7)).all()  # Flower's value: one neighbour each
    assert "assumes at least 5 results, got 3" in caplog.text


def test_multi_krum_is_weighted_by_num_examples_as_in_flower():
    # Flower's value: keep the two best of 0.2, 0.5, 1.0 (equal counts) -> 0.35
    s = Krum(num_malicious_clients=1, num_clients_to_keep=2)
    assert (only(s.aggregate_fit(1, rows(0.2, 0.5, 1.0), [])[0]) == np.float32(0.35)).all()
    # with counts 1 and 3 for the two kept, the mean is weighted: (0.2 + 3 * 0.5) / 4
    weighted = [(ClientProxy("0"), res([0.2] * 4, 1)), (ClientProxy("1"), res([0.5] * 4, 3))]
    weighted.append((ClientProxy("2"), res([1.0] * 4, 1)))
    for strategy in (s, MultiKrum(num_malicious_clients=1, num_clients_to_keep=2)):
        got = only(strategy.aggregate_fit(1, weighted, [])[0])
        np.testing.assert_allclose(got, 0.425, rtol=1e-6)
    unweighted = MultiKrum(num_malicious_clients=1, num_clients_to_keep=2, weighted=False)
    np.testing.assert_allclose(only(unweighted.aggregate_fit(1, weighted, [])[0]), 0.35, rtol=1e-6)


def test_bulyan_without_malicious_clients_averages_everything():
    # Flower's test: f = 0 selects all six; the mean of all
    s = Bulyan(num_malicious_clients=0, to_keep=0)
    results = [(MagicMock(), res([v] * 4)) for v in (0.2, 0.5, 0.7, 12.0, 0.1, 0.1)]
    want = np.float32((0.2 + 0.5 + 0.7 + 12.0 + 0.1 + 0.1) / 6)
    np.testing.assert_allclose(only(s.aggregate_fit(1, results, [])[0]), want, rtol=1e-6)


# -- FedAvg family ---------------------------------------------------------------------------


def test_fedavg_direct_aggregate_fit_is_the_weighted_mean():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(10, 4)), rng.normal(size=(3, 5, 2))]
    b = [rng.normal(size=(10, 4)), rng.normal(size=(3, 5, 2))]
    results = [
        (MagicMock(), FitRes(Status(), ndarrays_to_parameters(a), 1, {})),
        (MagicMock(), FitRes(Status(), ndarrays_to_parameters(b), 5, {})),
    ]
    for inplace in (True, False):
        params, _ = FedAvg(inplace=inplace).aggregate_fit(1, results, [])
        for got, x, y in zip(parameters_to_ndarrays(params), a, b, strict=True):
            np.testing.assert_allclose(got, (x + 5 * y) / 6)


EMPTY = Parameters(tensors=[], tensor_type="")


@pytest.mark.parametrize(
    ("rate", "n_results", "n_failures", "aggregated"),
    [
        (0.1, 0, 0, False),
        (0.1, 0, 1, False),
        (0.5, 1, 2, False),
        (0.5, 1, 1, True),
        (0.99, 1, 0, True),
    ],
)
def test_fault_tolerant_fedavg_completion_rates(rate, n_results, n_failures, aggregated):
    s = FaultTolerantFedAvg(min_completion_rate_fit=rate, min_completion_rate_evaluate=rate)
    fits = [(MagicMock(), FitRes(Status(), EMPTY, 1, {})) for _ in range(n_results)]
    evals = [(MagicMock(), EvaluateRes(Status(), 2.3, 1, {})) for _ in range(n_results)]
    failures = [Exception() for _ in range(n_failures)]
    params, _ = s.aggregate_fit(1, fits, failures)
    loss, _ = s.aggregate_evaluate(1, evals, failures)
    if aggregated:
        assert params is not None and parameters_to_ndarrays(params) == []
        assert loss == 2.3
    else:
        assert params is None and loss is None


# -- q-FedAvg --------------------------------------------------------------------------------


def test_qfedavg_uses_the_evaluate_loss_when_clients_report_none():
    # Flower's q-FedAvg: F = the centralized loss at the global model, for every client
    x0, lr, q = np.array([1.0, -1.0]), 0.1, 0.5
    s = QFedAvg(
        q_param=q,
        qffl_learning_rate=lr,
        initial_parameters=ndarrays_to_parameters([x0]),
        evaluate_fn=lambda rnd, arrays, config: (0.8, {}),
    )
    ys = [np.array([0.5, -0.5]), np.array([2.0, 0.0])]
    results = [(MagicMock(), FitRes(Status(), ndarrays_to_parameters([y]), 1, {})) for y in ys]
    got = only(s.aggregate_fit(1, results, [])[0])
    loss = 0.8 + 1e-10
    grads = [(x0 - y) / lr for y in ys]
    deltas = sum(loss**q * g for g in grads)
    hs = sum(q * loss ** (q - 1) * float(g @ g) + loss**q / lr for g in grads)
    np.testing.assert_allclose(got, x0 - deltas / hs, rtol=1e-12)


def test_qfedavg_without_any_loss_refuses_the_update_clearly():
    from fedhive.common.errors import InvalidUpdate

    s = QFedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    with pytest.raises(InvalidUpdate, match="evaluate_fn"):
        s.aggregate_fit(
            1, [(MagicMock(), FitRes(Status(), ndarrays_to_parameters([np.ones(2)]), 1, {}))], []
        )


def test_qfedavg_paper_variant_uses_each_clients_loss():
    s = QFedAvg(
        q_param=0.0,
        loss_source="client",
        initial_parameters=ndarrays_to_parameters([np.zeros(1)]),
        evaluate_fn=lambda rnd, arrays, config: (100.0, {}),  # ignored under "client"
    )
    results = [
        (MagicMock(), FitRes(Status(), ndarrays_to_parameters([np.array([v])]), 1, {"loss": 1.0}))
        for v in (1.0, 3.0)
    ]
    np.testing.assert_allclose(only(s.aggregate_fit(1, results, [])[0]), [2.0])  # q = 0: the mean
