"""Flower compatibility, strategies: every Flower-named strategy is a FedAvg with FedAvg's
surface, user overrides of the Flower methods run, and aggregate_fit can be called directly.

The behaviour asserted is Flower 1.x's documented behaviour (its strategy API and the
patterns its tests and examples use), written as fedhive's own tests.
"""

from __future__ import annotations

from unittest.mock import MagicMock

import numpy as np
import pytest

import fedhive as fl
from fedhive.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.server import ServerConfig, SimpleClientManager
from fedhive.server.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)
from fedhive.server.strategy.traits import MEAN_TRAITS, traits_of

INIT = ndarrays_to_parameters([np.zeros(3, np.float32)])

#: Flower's names, each built as Flower code builds it (the adaptive ones need a model).
FLOWER_STRATEGIES = {
    "FedAvgM": lambda **kw: FedAvgM(**kw),
    "FedProx": lambda **kw: FedProx(proximal_mu=0.1, **kw),
    "FedAdam": lambda **kw: FedAdam(initial_parameters=INIT, **kw),
    "FedYogi": lambda **kw: FedYogi(initial_parameters=INIT, **kw),
    "FedAdagrad": lambda **kw: FedAdagrad(initial_parameters=INIT, **kw),
    "QFedAvg": lambda **kw: QFedAvg(**kw),
    "FedMedian": lambda **kw: FedMedian(**kw),
    "FedTrimmedAvg": lambda **kw: FedTrimmedAvg(**kw),
    "Krum": lambda **kw: Krum(**kw),
    "MultiKrum": lambda **kw: MultiKrum(**kw),
    "Bulyan": lambda **kw: Bulyan(**kw),
}
NAMES = list(FLOWER_STRATEGIES)


def fit_res(value: float, n: int = 1, **metrics) -> FitRes:
    return FitRes(Status(), ndarrays_to_parameters([np.full(3, value, np.float32)]), n, metrics)


# -- (1) the FedAvg surface ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_flower_strategy_is_a_fedavg(name):
    assert isinstance(FLOWER_STRATEGIES[name](), FedAvg)


@pytest.mark.parametrize("name", NAMES)
def test_fedavg_options_are_readable_and_writable_attributes(name):
    on_fit = lambda rnd: {"lr": 0.1}  # noqa: E731
    s = FLOWER_STRATEGIES[name](
        fraction_fit=0.5,
        fraction_evaluate=0.25,
        min_fit_clients=3,
        min_evaluate_clients=4,
        min_available_clients=5,
        on_fit_config_fn=on_fit,
    )
    assert (s.fraction_fit, s.fraction_evaluate) == (0.5, 0.25)
    assert (s.min_fit_clients, s.min_evaluate_clients, s.min_available_clients) == (3, 4, 5)
    assert s.on_fit_config_fn is on_fit and s.evaluate_fn is None
    assert s.accept_failures is True
    s.fraction_fit = 1.0  # Flower code tunes strategies after building them
    assert s.num_fit_clients(10) == (10, 5)
    assert s.num_evaluation_clients(40) == (10, 5)  # int(40 * 0.25), the minimum is 4
    if name not in ("FedAdam", "FedYogi", "FedAdagrad"):
        assert s.initial_parameters is None


@pytest.mark.parametrize("name", NAMES)
def test_num_clients_follow_flowers_rule(name):
    s = FLOWER_STRATEGIES[name](fraction_evaluate=0.05)
    assert s.num_fit_clients(20) == (20, 2)
    assert s.num_fit_clients(9) == (9, 2)
    assert s.num_evaluation_clients(40) == (2, 2)
    assert s.num_evaluation_clients(19) == (2, 2)


@pytest.mark.parametrize("name", NAMES)
def test_super_configure_fit_samples_and_adds_the_config(name):
    s = FLOWER_STRATEGIES[name](on_fit_config_fn=lambda rnd: {"round": rnd})
    instructions = s.configure_fit(3, INIT, SimpleClientManager([str(i) for i in range(4)]))
    assert len(instructions) == 4
    assert all(ins.config["round"] == 3 for _, ins in instructions)
    if name == "FedProx":
        assert all(ins.config["proximal_mu"] == 0.1 for _, ins in instructions)


def test_traits_still_decide_dp_and_secure_aggregation():
    means = ("FedAvgM", "FedProx", "FedAdam", "FedYogi", "FedAdagrad")
    for name in NAMES:
        traits = traits_of(FLOWER_STRATEGIES[name]())
        assert traits.weighted_mean is (name in means), name
        robust = name in ("FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")
        assert traits.individual_updates is robust, name
    with pytest.raises(fl.ConfigError, match="median"):
        fl.privacy.DifferentialPrivacyServerSideFixedClipping(
            FedMedian(), noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=2
        )


# -- (2) user overrides ----------------------------------------------------------------------


def subclass_with_overrides(base: type, calls: list[str]) -> type:
    class Saving(base):  # type: ignore[misc, valid-type]
        def configure_fit(self, server_round, parameters, client_manager):
            calls.append("configure_fit")
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            calls.append(f"aggregate_fit:{len(results)}")
            params, metrics = super().aggregate_fit(server_round, results, failures)
            self.saved = None if params is None else parameters_to_ndarrays(params)
            return params, metrics

        def configure_evaluate(self, server_round, parameters, client_manager):
            calls.append("configure_evaluate")
            return super().configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round, results, failures):
            calls.append("aggregate_evaluate")
            return super().aggregate_evaluate(server_round, results, failures)

        def evaluate(self, server_round, parameters):
            calls.append("evaluate")
            return super().evaluate(server_round, parameters)

    return Saving


class _Client(fl.client.NumPyClient):
    def __init__(self, cid: str) -> None:
        self.value = float(cid)

    def get_parameters(self, config):
        return [np.zeros(3, np.float32)]

    def fit(self, parameters, config):
        return [parameters[0] + self.value], 1, {"loss": 1.0}

    def evaluate(self, parameters, config):
        return float(np.abs(parameters[0]).sum()), 1, {}


def _client_fn(context):
    return _Client(str(context.node_config["partition-id"])).to_client()


@pytest.mark.parametrize("name", NAMES)
def test_every_override_runs_in_a_simulation(name):
    calls: list[str] = []
    kwargs = {"initial_parameters": INIT} if name in ("FedAdam", "FedYogi", "FedAdagrad") else {}
    base = type(FLOWER_STRATEGIES[name]())
    extra = {"proximal_mu": 0.1} if name == "FedProx" else {}
    strategy = subclass_with_overrides(base, calls)(
        min_fit_clients=3, min_evaluate_clients=3, min_available_clients=3, **kwargs, **extra
    )
    fl.simulation.start_simulation(
        client_fn=_client_fn,
        num_clients=3,
        config=ServerConfig(num_rounds=2),
        strategy=strategy,
        seed=1,
    )
    assert calls.count("aggregate_fit:3") == 2, calls
    for hook in ("configure_fit", "configure_evaluate", "aggregate_evaluate", "evaluate"):
        assert calls.count(hook) >= 2, (hook, calls)
    assert strategy.saved is not None  # the "save the model every round" pattern works


@pytest.mark.parametrize("name", NAMES)
def test_an_aggregate_fit_override_makes_the_traits_a_buffering_strategys(name):
    cls = subclass_with_overrides(type(FLOWER_STRATEGIES[name]()), [])
    kwargs = {"initial_parameters": INIT} if name in ("FedAdam", "FedYogi", "FedAdagrad") else {}
    extra = {"proximal_mu": 0.1} if name == "FedProx" else {}
    traits = traits_of(cls(**kwargs, **extra))
    assert not traits.weighted_mean and "aggregate_fit" in traits.reason

    class StillAMean(cls):  # type: ignore[misc, valid-type]
        traits = MEAN_TRAITS

    assert traits_of(StillAMean(**kwargs, **extra)) == MEAN_TRAITS


def test_an_overridden_num_fit_clients_is_obeyed_by_configure_fit():
    class Two(FedAvgM):  # type: ignore[misc]
        def num_fit_clients(self, num_available_clients):
            return 2, 2

    instructions = Two().configure_fit(1, INIT, SimpleClientManager([str(i) for i in range(6)]))
    assert len(instructions) == 2


# -- (3) aggregate_fit without configure_fit -------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_aggregate_fit_can_be_called_first_with_mock_proxies(name):
    s = FLOWER_STRATEGIES[name]()
    results = [(MagicMock(), fit_res(v, 5, loss=1.0)) for v in (0.2, 0.5, 0.7, 1.0, 0.1, 0.1, 0.3)]
    params, _ = s.aggregate_fit(1, results, [])
    assert params is not None
    (arr,) = parameters_to_ndarrays(params)
    assert arr.shape == (3,) and arr.dtype == np.float32 and np.isfinite(arr).all()


def test_robust_rules_need_no_global_model():
    results = [(MagicMock(), fit_res(v)) for v in (1.0, 2.0, 9.0)]
    params, _ = FedMedian().aggregate_fit(1, results, [])
    assert parameters_to_ndarrays(params)[0].tolist() == [2.0, 2.0, 2.0]


def test_repeated_direct_calls_move_the_model_on_as_flowers_current_weights():
    s = FedAvgM(initial_parameters=INIT, server_learning_rate=0.5)
    results = [(MagicMock(), fit_res(1.0))]
    first, _ = s.aggregate_fit(1, results, [])
    second, _ = s.aggregate_fit(2, results, [])
    assert parameters_to_ndarrays(first)[0].tolist() == [0.5] * 3
    assert parameters_to_ndarrays(second)[0].tolist() == [0.75] * 3


def test_a_server_optimizer_without_any_model_is_refused_clearly():
    s = FedAvgM(server_momentum=0.9)
    with pytest.raises(fl.ConfigError, match="initial_parameters"):
        s.aggregate_fit(1, [(MagicMock(), fit_res(1.0))], [])


def test_aggregate_evaluate_and_configure_evaluate_work_directly():
    s = Krum(fraction_evaluate=0.5)
    ins = s.configure_evaluate(1, INIT, SimpleClientManager([str(i) for i in range(4)]))
    assert len(ins) == 2 and all(isinstance(i, EvaluateIns) for _, i in ins)
    results = [
        (MagicMock(), EvaluateRes(Status(), loss, n, {})) for loss, n in ((1.0, 1), (4.0, 3))
    ]
    assert s.aggregate_evaluate(1, results, [])[0] == pytest.approx(3.25)
    assert isinstance(ins[0][1], EvaluateIns) and not isinstance(ins[0][1], FitIns)
