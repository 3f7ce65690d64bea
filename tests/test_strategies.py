"""Strategy library: each rule against hand-computed results, optimizers, state, validation."""

from __future__ import annotations

import inspect
import typing

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from fedhive.common import (
    ConfigError,
    FitRes,
    InvalidUpdate,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.common.serde import decode_record_dict, encode_record_dict
from fedhive.server import SimpleClientManager
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy import (
    Bulyan,
    ComposedStrategy,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedNova,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Scaffold,
    Strategy,
)
from fedhive.server.strategy.composed import FedAvgArgs, MeanRule
from fedhive.server.strategy.fednova import local_norm
from fedhive.server.strategy.optimizers import Adaptive, ServerSGD

Reply = tuple[str, list[np.ndarray], int, dict]


def params(*arrays) -> object:
    return ndarrays_to_parameters([np.asarray(a, dtype=np.float64) for a in arrays])


def aggregate(strategy: Strategy, global_arrays, replies: list[Reply], rnd: int = 1):
    """One round of ``strategy``'s aggregator; the new model's arrays (or None)."""
    aggregator = strategy.fit_aggregator(rnd, ndarrays_to_parameters(global_arrays))
    for cid, arrays, n, metrics in replies:
        res = FitRes(Status(), ndarrays_to_parameters(arrays), n, metrics)
        aggregator.add(ClientProxy(cid), res)
    new, _ = aggregator.finalize()
    return None if new is None else parameters_to_ndarrays(new)


def scalar_replies(values, weights=None, **metrics) -> list[Reply]:
    weights = weights or [1] * len(values)
    return [
        (str(i), [np.array([v], dtype=np.float64)], w, dict(metrics))
        for i, (v, w) in enumerate(zip(values, weights, strict=True))
    ]


X0 = [np.array([0.0])]

# -- the composition contract ------------------------------------------------------------

ALL = [
    FedAvgM,
    FedProx,
    FedAdam,
    FedYogi,
    FedAdagrad,
    QFedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Bulyan,
    Scaffold,
    FedNova,
]


@pytest.mark.parametrize("cls", ALL)
def test_strategies_compose_and_keep_inheritance_shallow(cls):
    # Strategy -> FedAvg -> ComposedStrategy -> the named strategy: Flower code needs
    # isinstance(s, FedAvg); the composition stays inside (sampling, rule, optimizer).
    depth = cls.__mro__.index(Strategy)
    assert depth <= 3, cls.__mro__
    assert issubclass(cls, ComposedStrategy) and issubclass(cls, FedAvg)
    params_of = inspect.signature(cls).parameters
    assert all(p.kind is not p.VAR_KEYWORD or p.name == "fedavg" for p in params_of.values())


def test_fedavg_args_mirror_fedavg_signature():
    fedavg = [n for n in inspect.signature(FedAvg.__init__).parameters if n != "self"]
    assert list(typing.get_type_hints(FedAvgArgs)) == fedavg


def test_fedavg_options_pass_through_and_bad_names_are_refused():
    s = FedAvgM(fraction_fit=0.3, min_fit_clients=4, server_momentum=0.9)
    assert s.sampling.fraction_fit == 0.3 and s.sampling.min_fit_clients == 4
    with pytest.raises(TypeError):
        FedAvgM(fraction_fitt=0.3)


# -- server optimizers ---------------------------------------------------------------------


def test_fedavgm_momentum_by_hand():
    s = FedAvgM(server_learning_rate=1.0, server_momentum=0.5)
    x1 = aggregate(s, X0, scalar_replies([1.0, 3.0], [1, 3]))  # mean 2.5, v = 2.5
    assert x1[0][0] == 2.5
    x2 = aggregate(s, x1, scalar_replies([3.5, 3.5]), rnd=2)  # delta 1, v = 1.25 + 1
    assert x2[0][0] == pytest.approx(4.75)
    lr = FedAvgM(server_learning_rate=0.5)
    assert aggregate(lr, X0, scalar_replies([2.0]))[0][0] == 1.0


arrays_and_weights = st.lists(
    st.tuples(
        st.lists(st.floats(-100, 100, allow_subnormal=False), min_size=3, max_size=3),
        st.integers(1, 50),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(arrays_and_weights, st.lists(st.floats(-10, 10), min_size=3, max_size=3))
def test_fedavgm_without_momentum_is_fedavg(replies, start):
    x = [np.asarray(start, np.float32)]
    rep = [(str(i), [np.asarray(v, np.float32)], n, {}) for i, (v, n) in enumerate(replies)]
    a = aggregate(FedAvgM(server_momentum=0.0), x, rep)
    b = aggregate(FedAvg(), x, rep)
    assert a[0].dtype == b[0].dtype == np.float32
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_fedadam_paper_variant_first_step_closed_form():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x0 = np.array([0.5, -1.0, 2.0])
    target = np.array([1.5, -1.0, 1.0])
    s = FedAdam(
        initial_parameters=params(x0), eta=eta, beta_1=b1, beta_2=b2, tau=tau, variant="paper"
    )  # fmt: skip
    new = aggregate(s, [x0], [("0", [target], 1, {})])[0]
    delta = target - x0
    m = (1 - b1) * delta
    v = b2 * tau**2 + (1 - b2) * delta**2
    np.testing.assert_allclose(new, x0 + eta * m / (np.sqrt(v) + tau), rtol=1e-12)
    corrected = FedAdam(
        initial_parameters=params(x0), eta=eta, tau=tau, bias_correction=True, variant="paper"
    )
    new_c = aggregate(corrected, [x0], [("0", [target], 1, {})])[0]
    np.testing.assert_allclose(new_c, x0 + eta * (m / 0.1) / (np.sqrt(v / 0.01) + tau), rtol=1e-12)


def test_fedyogi_and_fedadagrad_paper_variants_first_steps_by_hand():
    x0, target = np.array([0.0, 0.0]), np.array([2.0, 1e-3])
    delta = target - x0
    yogi = FedYogi(initial_parameters=params(x0), eta=0.01, tau=1e-3, variant="paper")
    v = 1e-6 - 0.01 * delta**2 * np.sign(1e-6 - delta**2)
    expected = x0 + 0.01 * 0.1 * delta / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(aggregate(yogi, [x0], [("0", [target], 1, {})])[0], expected)
    ada = FedAdagrad(initial_parameters=params(x0), eta=0.1, tau=1e-3, variant="paper")
    x1 = aggregate(ada, [x0], [("0", [target], 1, {})])[0]
    v1 = 1e-6 + delta**2
    np.testing.assert_allclose(x1, x0 + 0.1 * delta / (np.sqrt(v1) + 1e-3))
    x2 = aggregate(ada, [x1], [("0", [x1 + 1.0], 1, {})], rnd=2)[0]  # delta = 1
    np.testing.assert_allclose(x2, x1 + 0.1 / (np.sqrt(v1 + 1.0) + 1e-3))


def test_optimizer_output_is_cast_to_the_model_dtype_and_int_layers_become_float64():
    s = FedAvgM(server_momentum=0.5)
    x = [np.zeros(2, np.float32), np.zeros(1, np.int64)]
    new = aggregate(s, x, [("0", [np.ones(2, np.float32), np.array([3])], 1, {})])
    assert new[0].dtype == np.float32 and new[1].dtype == np.float64
    assert new[1][0] == 3.0


# -- FedProx -------------------------------------------------------------------------------


def test_fedprox_sends_mu_without_touching_the_callers_config():
    base = {"lr": 0.1}
    s = FedProx(proximal_mu=0.5, on_fit_config_fn=lambda rnd: base, fraction_evaluate=0.0)
    manager = SimpleClientManager(["a", "b"], seed=0)
    instructions = s.configure_fit(1, params([0.0]), manager)
    assert len(instructions) == 2
    assert all(ins.config == {"lr": 0.1, "proximal_mu": 0.5} for _, ins in instructions)
    assert base == {"lr": 0.1}
    # the server side is FedAvg's weighted mean
    assert aggregate(s, X0, scalar_replies([1.0, 4.0], [2, 1]))[0][0] == 2.0


# -- q-FedAvg ------------------------------------------------------------------------------


def test_qfedavg_by_hand():
    # L = 1/0.1 = 10. A: dw = 10 * (0 - -0.1) = 1, F = 2; B: dw = -1, F = 1; q = 1
    # delta = 2*1 + 1*(-1) = 1; h = (1*1 + 10*2) + (1*1 + 10*1) = 32
    s = QFedAvg(q_param=1.0, qffl_learning_rate=0.1)
    replies = [
        ("a", [np.array([-0.1])], 5, {"loss": 2.0}),
        ("b", [np.array([0.1])], 1, {"loss": 1.0}),
    ]
    assert aggregate(s, X0, replies)[0][0] == pytest.approx(-1 / 32, rel=1e-8)


@settings(max_examples=30, deadline=None)
@given(arrays_and_weights, st.floats(0.01, 5.0))
def test_qfedavg_with_q_zero_is_the_unweighted_mean(replies, loss):
    rep = [(str(i), [np.asarray(v)], n, {"loss": loss}) for i, (v, n) in enumerate(replies)]
    new = aggregate(QFedAvg(q_param=0.0, qffl_learning_rate=0.3), [np.zeros(3)], rep)
    expected = np.mean([np.asarray(v) for v, _ in replies], axis=0)
    np.testing.assert_allclose(new[0], expected, rtol=1e-9, atol=1e-9)


def test_qfedavg_refuses_a_reply_without_loss():
    agg = QFedAvg().fit_aggregator(1, params([0.0]))
    with pytest.raises(InvalidUpdate, match="'loss'"):
        agg.add(ClientProxy("7"), FitRes(Status(), params([1.0]), 1, {}))


# -- FedNova -------------------------------------------------------------------------------


def test_fednova_normalizes_by_reported_steps():
    # A: 1 step moved +1; B: 4 steps moved +2. p = 1/2 each.
    # d = 1/2 * 1/1 + 1/2 * 2/4 = 0.75; tau_eff = 2.5 -> +1.875 (FedAvg: +1.5)
    replies = [
        ("a", [np.array([1.0])], 1, {"num_steps": 1}),
        ("b", [np.array([2.0])], 1, {"num_steps": 4}),
    ]
    assert aggregate(FedNova(), X0, replies)[0][0] == pytest.approx(1.875)
    assert aggregate(FedAvg(), X0, replies)[0][0] == pytest.approx(1.5)
    half = FedNova(server_learning_rate=0.5)
    assert aggregate(half, X0, replies)[0][0] == pytest.approx(0.9375)


def test_fednova_momentum_norm_and_missing_steps():
    # rho = 0.5, 2 steps: a = [1 - rho^2, 1 - rho] / (1 - rho) = [1.5, 1]
    assert local_norm(2, 0.5) == pytest.approx(2.5)
    assert local_norm(7, 0.0) == 7
    agg = FedNova().fit_aggregator(1, params([0.0]))
    with pytest.raises(InvalidUpdate, match="num_steps"):
        agg.add(ClientProxy("1"), FitRes(Status(), params([1.0]), 1, {"loss": 1.0}))


@settings(max_examples=30, deadline=None)
@given(arrays_and_weights, st.integers(1, 20))
def test_fednova_with_equal_steps_is_fedavg(replies, steps):
    rep = [(str(i), [np.asarray(v)], n, {"num_steps": steps}) for i, (v, n) in enumerate(replies)]
    a = aggregate(FedNova(), [np.zeros(3)], rep)
    b = aggregate(FedAvg(), [np.zeros(3)], rep)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-9, atol=1e-9)


# -- state: checkpoint and restore continue identically -------------------------------------

INIT = params(np.zeros(3))


def stateful():
    return [
        lambda: FedAvgM(server_momentum=0.9, server_learning_rate=0.7),
        lambda: FedAdam(initial_parameters=INIT, eta=0.05, tau=1e-3),
        lambda: FedAdam(initial_parameters=INIT, tau=1e-3, bias_correction=True),
        lambda: FedYogi(initial_parameters=INIT),
        lambda: FedAdagrad(initial_parameters=INIT, beta_1=0.5),
    ]


def round_replies(rnd: int, x) -> list[Reply]:
    rng = np.random.default_rng(rnd)
    return [(str(i), [x[0] + rng.normal(size=3)], i + 1, {}) for i in range(3)]


def run_rounds(strategy, x, rounds):
    for rnd in rounds:
        x = aggregate(strategy, x, round_replies(rnd, x), rnd=rnd)
    return x


@pytest.mark.parametrize("make", stateful())
def test_state_dict_round_trip_continues_identically(make):
    x0 = [np.zeros(3)]
    straight = run_rounds(make(), x0, range(1, 5))
    first = make()
    x2 = run_rounds(first, x0, range(1, 3))
    state = decode_record_dict(bytearray(encode_record_dict(first.state_dict())))
    second = make()
    second.load_state_dict(state)
    resumed = run_rounds(second, x2, range(3, 5))
    np.testing.assert_array_equal(resumed[0], straight[0])
    fresh = run_rounds(make(), x2, range(3, 5))
    assert not np.array_equal(fresh[0], straight[0])  # the state mattered


def test_loading_another_optimizers_state_is_refused():
    adam = FedAdam(initial_parameters=INIT)
    run_rounds(adam, [np.zeros(3)], [1])
    with pytest.raises(ConfigError, match="'adam'"):
        FedYogi(initial_parameters=INIT).load_state_dict(adam.state_dict())
    moved = FedAvgM(server_momentum=0.5)
    run_rounds(moved, [np.zeros(3)], [1])
    with pytest.raises(ConfigError, match="model changed"):
        aggregate(moved, [np.zeros(4)], [("0", [np.ones(4)], 1, {})])


def test_stateless_strategies_have_empty_state():
    for s in (FedProx(proximal_mu=0.1), FedMedian(), QFedAvg(), FedNova(), Krum()):
        assert s.state_dict().is_empty()


# -- failures, list-based aggregation, composition by hand -----------------------------------


def test_accept_failures_false_keeps_the_model():
    s = FedAvgM(server_momentum=0.5, accept_failures=False)
    agg = s.fit_aggregator(1, params([0.0]))
    agg.add(ClientProxy("0"), FitRes(Status(), params([1.0]), 1, {}))
    agg.add_failure(RuntimeError("lost"))
    assert agg.finalize() == (None, {})
    assert s.state_dict() == ServerSGD(1.0, 0.5).state_dict()  # the optimizer did not move


def test_flower_list_aggregate_fit_validates_and_uses_the_configured_model():
    s = FedMedian(fraction_evaluate=0.0, fit_metrics_aggregation_fn=lambda m: {"n": len(m)})
    assert s.aggregate_fit(1, [], []) == (None, {})  # nothing to aggregate, as in Flower
    s.configure_fit(1, params([0.0, 0.0]), SimpleClientManager(["0", "1"], seed=0))
    results = [
        (ClientProxy(str(i)), FitRes(Status(), params([v, -v]), 1, {}))
        for i, v in enumerate([1, 2, 9])
    ]
    new, metrics = s.aggregate_fit(1, results, [])
    np.testing.assert_array_equal(parameters_to_ndarrays(new)[0], [2.0, -2.0])
    assert metrics == {"n": 3}
    bad = [(ClientProxy("x"), FitRes(Status(), params([np.nan, 0.0]), 1, {}))]
    with pytest.raises(InvalidUpdate, match="NaN"):
        s.aggregate_fit(1, bad, [])


def test_a_custom_composition_runs_krum_then_adam():
    from fedhive.server.strategy.robust import KrumRule

    s = ComposedStrategy(
        sampling=FedAvg(),
        rule=KrumRule(num_malicious_clients=1),
        server_optimizer=Adaptive("adam", eta=1.0, beta_1=0.0, beta_2=0.0, tau=1e-12),
    )
    new = aggregate(s, X0, scalar_replies([1.0, 1.1, 0.9, 1.05, 500.0]))
    assert new[0][0] == pytest.approx(1.0)  # Krum picks ~1, Adam with beta=0 steps by sign
    assert "KrumRule" in repr(s)


def test_weighted_mean_rule_respects_max_num_examples():
    s = ComposedStrategy(sampling=FedAvg(max_num_examples=1), rule=MeanRule())
    assert aggregate(s, X0, scalar_replies([1.0, 3.0], [1, 100]))[0][0] == 2.0


# -- construction-time validation -----------------------------------------------------------

BAD = [
    (lambda: FedProx(proximal_mu=-0.1), "proximal_mu"),
    (lambda: FedProx(proximal_mu=float("nan")), "proximal_mu"),
    (lambda: FedTrimmedAvg(beta=0.5), r"beta .* \[0, 0.5\)"),
    (lambda: FedTrimmedAvg(beta=-0.1), "beta"),
    (lambda: FedAdam(initial_parameters=INIT, tau=0.0), "tau"),
    (lambda: FedYogi(initial_parameters=INIT, tau=-1.0), "tau"),
    (lambda: FedAdagrad(initial_parameters=INIT, eta=0.0), "eta"),
    (lambda: FedAdam(initial_parameters=INIT, beta_1=1.0), "beta_1"),
    (lambda: FedAdam(initial_parameters=INIT, eta_l=-1.0), "eta_l"),
    (lambda: FedAdam(), "initial_parameters"),
    (lambda: FedYogi(), "initial_parameters"),
    (lambda: FedAdagrad(), "initial_parameters"),
    (lambda: FedAvgM(server_momentum=1.0), "server_momentum"),
    (lambda: FedAvgM(server_learning_rate=0.0), "server_learning_rate"),
    (lambda: QFedAvg(q_param=-1.0), "q_param"),
    (lambda: QFedAvg(qffl_learning_rate=0.0), "qffl_learning_rate"),
    (lambda: FedNova(local_momentum=1.0), "local_momentum"),
    (lambda: Scaffold(server_learning_rate=-1.0), "server_learning_rate"),
    (lambda: Krum(num_malicious_clients=-1), "num_malicious_clients"),
    (lambda: MultiKrum(num_clients_to_keep=-2), "num_clients_to_keep"),
    (lambda: Bulyan(to_keep=-1), "to_keep"),
    (lambda: Bulyan(num_malicious_clients=1, fraction_fit=0.0, min_fit_clients=6), "at least 7"),
    (lambda: FedMedian(fraction_fit=2.0), "fraction_fit"),
    (lambda: ComposedStrategy(sampling=FedAvg(), rule=MeanRule(), fit_config={"a": [1]}), "a"),
    (lambda: ComposedStrategy(sampling=object(), rule=MeanRule()), "sampling"),
]


@pytest.mark.parametrize(("make", "match"), BAD)
def test_invalid_parameters_raise_config_error(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_sampling_that_can_reach_enough_clients_is_accepted():
    Krum(num_malicious_clients=2, fraction_fit=0.0, min_fit_clients=7)
    Krum(num_malicious_clients=2, fraction_fit=0.0, min_fit_clients=6)  # as Flower: warns later
    Krum(num_malicious_clients=5)  # fraction_fit=1 may sample enough: checked per round
    Bulyan(num_malicious_clients=1, fraction_fit=0.0, min_fit_clients=7)
