"""End-to-end behaviour of start_simulation with FedAvg (Flower-compatible patterns)."""

from __future__ import annotations

import numpy as np
import pytest

import fedhive as fl
from conftest import AddClient, add_client_fn, initial, noisy_client_fn, weighted_acc
from fedhive.common import ConfigError, ndarrays_to_parameters, parameters_to_ndarrays
from fedhive.server import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation


def run(strategy, num_clients=3, rounds=1, **kwargs):
    return start_simulation(
        client_fn=kwargs.pop("client_fn", add_client_fn),
        num_clients=num_clients,
        config=kwargs.pop("config", ServerConfig(num_rounds=rounds)),
        strategy=strategy,
        seed=kwargs.pop("seed", 0),
        **kwargs,
    )


class Saving(FedAvg):
    """The Flower users' favourite: save the aggregated model every round."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.saved: list[list[np.ndarray]] = []
        self.result_counts: list[int] = []

    def aggregate_fit(self, server_round, results, failures):
        self.result_counts.append(len(results))
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            self.saved.append(parameters_to_ndarrays(params))
        return params, metrics


def test_fedavg_weighted_mean_of_three_clients():
    strategy = FedAvg(min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0)
    saving = Saving(min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0)
    hist = run(saving)
    expected = (1 * 1 + 2 * 2 + 3 * 3) / 6  # deltas 1,2,3 weighted by 1,2,3 examples
    (final,) = saving.saved
    np.testing.assert_allclose(final[0], np.full(4, expected, np.float32), rtol=1e-6)
    assert final[0].dtype == np.float32
    assert hist.rounds[-1]["fit"]["num_results"] == 3
    assert strategy.min_fit_clients == 3


def test_both_client_fn_signatures_give_the_same_history():
    def by_cid(cid: str):
        return AddClient(int(cid))

    def by_context(context):
        return AddClient(int(context.node_config["partition-id"]))

    strategy = dict(min_fit_clients=2, min_available_clients=2, fraction_fit=0.5)
    a = run(FedAvg(**strategy), num_clients=4, rounds=2, client_fn=by_cid)
    b = run(FedAvg(**strategy), num_clients=4, rounds=2, client_fn=by_context)
    assert a.without_timings()["rounds"] == b.without_timings()["rounds"]


def test_flower_metrics_function_and_evaluate_fn_and_round_zero():
    seen = []

    def evaluate_fn(server_round, parameters, config):
        seen.append(server_round)
        return float(parameters[0].sum()), {"sum": float(parameters[0].sum())}

    strategy = FedAvg(
        min_fit_clients=3,
        min_evaluate_clients=3,
        min_available_clients=3,
        evaluate_fn=evaluate_fn,
        evaluate_metrics_aggregation_fn=weighted_acc,
        fit_metrics_aggregation_fn=lambda m: {"n": len(m)},
        initial_parameters=ndarrays_to_parameters([np.zeros(4, np.float32), np.zeros((2, 3))]),
    )
    hist = run(strategy, rounds=2)
    assert seen == [0, 1, 2]
    assert [r for r, _ in hist.losses_centralized] == [0, 1, 2]
    assert hist.losses_centralized[0][1] == 0.0
    assert hist.metrics_distributed["acc"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.1))]
    assert hist.metrics_distributed_fit["n"] == [(1, 3), (2, 3)]
    assert [r for r, _ in hist.losses_distributed] == [1, 2]
    clients = hist.rounds[-1]["distributed"]["clients"]
    assert sorted(c["client_id"] for c in clients) == ["0", "1", "2"]
    assert all(c["num_examples"] == 2 for c in clients)


def test_subclass_overriding_aggregate_fit_gets_every_result_each_round():
    strategy = Saving(min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0)
    run(strategy, rounds=3)
    assert strategy.result_counts == [3, 3, 3]
    assert len(strategy.saved) == 3
    assert strategy.saved[2][0][0] > strategy.saved[1][0][0] > strategy.saved[0][0][0]


def test_on_fit_config_fn_reaches_clients_and_configure_fit_can_be_overridden():
    received = []

    class Echo(fl.client.NumPyClient):
        def fit(self, parameters, config):
            received.append(dict(config))
            return parameters, 1, {}

    class OnlyOne(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            return super().configure_fit(server_round, parameters, client_manager)[:1]

    strategy = OnlyOne(
        on_fit_config_fn=lambda rnd: {"round": rnd, "lr": 0.1},
        fraction_evaluate=0.0,
        initial_parameters=initial(),
    )
    run(strategy, num_clients=4, rounds=2, client_fn=lambda cid: Echo())
    assert received == [{"round": 1, "lr": 0.1}, {"round": 2, "lr": 0.1}]


def test_min_values_govern_sampling():
    strategy = FedAvg(fraction_fit=0.1, min_fit_clients=5, min_available_clients=5)
    strategy.fraction_evaluate = 0.0
    hist = run(strategy, num_clients=20)
    assert hist.rounds[-1]["fit"]["num_clients"] == 5

    too_many = FedAvg(min_available_clients=30, fraction_evaluate=0.0)
    hist = run(too_many, num_clients=20)
    fit = hist.rounds[-1]["fit"]
    assert fit["num_clients"] == 0 and fit["updated"] is False and "no clients" in fit["note"]


def test_initial_parameters_come_from_a_client_when_strategy_has_none():
    strategy = Saving(min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0)
    run(strategy)
    assert [a.shape for a in strategy.saved[0]] == [(4,), (2, 3)]


def test_max_num_examples_caps_weights():
    strategy = Saving(
        min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0, max_num_examples=1
    )
    run(strategy)
    np.testing.assert_allclose(strategy.saved[0][0], 2.0)  # plain mean of deltas 1, 2, 3


def test_virtual_clients_are_built_only_when_sampled():
    built = []

    def client_fn(context):
        built.append(context.node_id)
        return AddClient(0)

    strategy = FedAvg(
        fraction_fit=0.0005,
        min_fit_clients=1,
        fraction_evaluate=0.0,
        initial_parameters=initial(),
    )
    hist = run(strategy, num_clients=10_000, rounds=2, client_fn=client_fn)
    assert len(built) == 2 * 5
    assert hist.rounds[-1]["fit"]["num_results"] == 5


def test_per_client_state_persists_across_rounds_in_memory_and_on_disk(tmp_path):
    for limit in (1 << 20, 0):
        seen: list[int] = []

        class Counter(fl.client.NumPyClient):
            def __init__(self, context, seen=seen):
                self.context = context
                self.seen = seen

            def fit(self, parameters, config):
                rec = self.context.state.array_records.setdefault(
                    "count", {"n": np.zeros(1000, np.int64)}
                )
                rec["n"] += 1
                self.seen.append(int(rec["n"][0]))
                return parameters, 1, {}

        strategy = FedAvg(fraction_evaluate=0.0, initial_parameters=initial())
        run(
            strategy,
            num_clients=2,
            rounds=3,
            client_fn=Counter,
            state_memory_limit=limit,
            state_dir=tmp_path / f"state{limit}",
        )
        assert sorted(seen) == [1, 1, 2, 2, 3, 3]
        on_disk = list((tmp_path / f"state{limit}").glob("*.fhv"))
        assert len(on_disk) == (2 if limit == 0 else 0)


@pytest.mark.parametrize("workers", [2, 3])
def test_seeded_history_identical_whatever_the_number_of_workers(workers):
    def go(num_workers, seed=7):
        strategy = FedAvg(
            fraction_fit=0.5,
            fraction_evaluate=0.3,
            min_fit_clients=2,
            min_evaluate_clients=2,
            initial_parameters=initial((16,)),
            evaluate_metrics_aggregation_fn=lambda m: {"n": sum(n for n, _ in m)},
        )
        hist = run(
            strategy,
            num_clients=12,
            rounds=4,
            client_fn=noisy_client_fn,
            num_workers=num_workers,
            seed=seed,
        )
        return hist.without_timings()

    one = go(1)
    assert one == go(workers)
    assert one != go(1, seed=8)


def test_model_dtype_rules():
    class Mixed(fl.client.NumPyClient):
        def fit(self, parameters, config):
            return [parameters[0].astype(np.float64) + 0.5, np.array([3, 4])], 1, {}

    strategy = Saving(fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2)
    strategy.initial_parameters = ndarrays_to_parameters(
        [np.zeros(2, np.float32), np.array([1, 2], np.int64)]
    )
    run(strategy, num_clients=2, client_fn=lambda cid: Mixed())
    floats, ints = strategy.saved[0]
    assert floats.dtype == np.float32  # float64 replies cast to the model's dtype
    assert ints.dtype == np.float64  # integer layers averaged as real numbers (Flower)
    np.testing.assert_array_equal(ints, [3.0, 4.0])


def test_bad_arguments_fail_early():
    with pytest.raises(ConfigError, match="fraction_fit"):
        FedAvg(fraction_fit=1.5)
    with pytest.raises(ConfigError, match="num_rounds"):
        ServerConfig(num_rounds=-1)
    with pytest.raises(ConfigError, match="round_timeout"):
        ServerConfig(round_timeout=0)
    with pytest.raises(ConfigError, match="num_clients"):
        start_simulation(client_fn=add_client_fn, num_clients=0)
    with pytest.raises(ConfigError, match="backend"):
        start_simulation(client_fn=add_client_fn, num_clients=2, backend="gpu")
    with pytest.raises(TypeError, match="unexpected"):
        start_simulation(client_fn=add_client_fn, num_clients=2, not_an_option=1)


def test_process_backend_matches_thread_backend():
    def go(backend):
        strategy = FedAvg(fraction_fit=0.5, min_fit_clients=2, initial_parameters=initial((16,)))
        return run(
            strategy,
            num_clients=6,
            rounds=2,
            client_fn=noisy_client_fn,
            backend=backend,
            num_workers=2,
        ).without_timings()["rounds"]

    assert go("process") == go("thread")


def test_process_backend_refuses_unpicklable_client_fn():
    with pytest.raises(ConfigError, match="picklable"):
        start_simulation(
            client_fn=lambda cid: AddClient(0), num_clients=2, backend="process", num_workers=1
        )


def test_round_deadline_on_the_engines_manual_clock(release):
    from fedhive.common.clock import ManualClock

    clock = ManualClock()

    class Hang(fl.client.NumPyClient):
        def __init__(self, cid):
            self.cid = cid

        def fit(self, parameters, config):
            if self.cid == "1":
                clock.advance(61.0)  # the "slow" client makes virtual time pass
                release.wait(30)
            return [p + 1 for p in parameters], 1, {}

    strategy = FedAvg(
        min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0,
        initial_parameters=initial((2,)),
    )  # fmt: skip
    hist = start_simulation(
        client_fn=Hang, num_clients=3, strategy=strategy, clock=clock, seed=0,
        config=ServerConfig(num_rounds=1, round_timeout=60.0), num_workers=3,
    )  # fmt: skip
    record = hist.rounds[-1]
    assert [f["client_id"] for f in record["failures"]] == ["1"]
    assert record["fit"]["num_results"] == 2


def test_overriding_evaluate_replaces_centralized_evaluation():
    class MyEval(FedAvg):
        def evaluate(self, server_round, parameters):
            return float(server_round), {"custom": True}

    strategy = MyEval(min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0)
    hist = run(strategy, rounds=2)
    assert hist.losses_centralized == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert hist.metrics_centralized["custom"] == [(0, True), (1, True), (2, True)]
