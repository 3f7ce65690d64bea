"""Strategies end to end in start_simulation: SCAFFOLD, FedProx, resume, every class runs."""

from __future__ import annotations

import numpy as np
import pytest

import fedhive as fl
from fedhive.cli.experiment import ClientFactory, ModelSpec, SimClient
from fedhive.client.mods import SCAFFOLD_STATE, scaffold_mod
from fedhive.common import ConfigError, ndarrays_to_parameters, parameters_to_ndarrays
from fedhive.models import numpy_lr
from fedhive.server import RoundCallback, ServerConfig
from fedhive.server.strategy import (
    Bulyan,
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
)
from fedhive.simulation import start_simulation

DIM, CLASSES, CLIENTS = 5, 3, 6
FIT_CONFIG = {"local_epochs": 2, "batch_size": 8, "lr": 0.2, "momentum": 0.0}


def make_data(seed: int = 0):
    """Per-client shifted Gaussian blobs: heterogeneous enough for drift to matter."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, size=(CLASSES, DIM))
    xs, ys, splits, start = [], [], [], 0
    for k in range(CLIENTS):
        n = 24 + 8 * k
        y = rng.choice(CLASSES, size=n, p=np.roll([0.7, 0.2, 0.1], k))
        x = centres[y] + rng.normal(0, 1.0, size=(n, DIM)) + 0.5 * k
        xs.append(x), ys.append(y)
        idx = np.arange(start, start + n)
        splits.append((idx[: n - 6], idx[n - 6 :]))
        start += n
    spec = ModelSpec("logreg", DIM, CLASSES, 0)
    return ClientFactory(spec, np.concatenate(xs), np.concatenate(ys), splits), spec


FACTORY, SPEC = make_data()


def initial_model():
    return ndarrays_to_parameters(SPEC.initial(0))


def fedavg_args(**extra):
    return dict(
        fraction_fit=0.5,
        min_fit_clients=3,
        fraction_evaluate=0.0,
        on_fit_config_fn=lambda rnd: dict(FIT_CONFIG),
        initial_parameters=initial_model(),
        **extra,
    )


class Final(RoundCallback):
    def __init__(self) -> None:
        self.models: list[list[np.ndarray]] = []

    def on_round_end(self, engine, record):
        self.models.append([a.copy() for a in parameters_to_ndarrays(engine.parameters)])


def simulate(strategy, rounds=3, mods=(), callbacks=(), **kwargs):
    final = Final()
    hist = start_simulation(
        client_fn=FACTORY,
        num_clients=CLIENTS,
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
        seed=kwargs.pop("seed", 3),
        num_workers=2,
        mods=mods,
        callbacks=[final, *callbacks],
        **kwargs,
    )
    return hist, final.models


# -- every strategy runs with the reference client ------------------------------------------

EVERY = {
    "fedavgm": lambda: FedAvgM(server_momentum=0.9, **fedavg_args()),
    "fedprox": lambda: FedProx(proximal_mu=0.1, **fedavg_args()),
    "fedadam": lambda: FedAdam(eta=0.05, tau=1e-3, **fedavg_args()),
    "fedyogi": lambda: FedYogi(**fedavg_args()),
    "fedadagrad": lambda: FedAdagrad(eta=0.05, tau=1e-3, **fedavg_args()),
    "qfedavg": lambda: QFedAvg(q_param=1.0, qffl_learning_rate=0.2, **fedavg_args()),
    "fednova": lambda: FedNova(**fedavg_args()),
    "median": lambda: FedMedian(**fedavg_args()),
    "trimmed": lambda: FedTrimmedAvg(beta=0.2, **fedavg_args()),
    "krum": lambda: Krum(**fedavg_args()),
    "multikrum": lambda: MultiKrum(**fedavg_args()),
    "bulyan": lambda: Bulyan(**fedavg_args()),
}


@pytest.mark.parametrize("name", EVERY)
def test_every_strategy_trains_the_reference_model(name):
    hist, models = simulate(EVERY[name](), rounds=3)
    assert all(r["fit"]["updated"] for r in hist.rounds[1:]), hist.rounds[-1]
    x, y = FACTORY.x, FACTORY.y
    before = numpy_lr.evaluate(SPEC.initial(0), x, y)[0]
    after = numpy_lr.evaluate(models[-1], x, y)[0]
    assert after < before, (name, before, after)
    assert models[-1][0].dtype == np.float32


# -- SCAFFOLD --------------------------------------------------------------------------------


def spying(store: dict):
    """A mod outside scaffold_mod that records each client's stored variate after a fit."""

    def spy(message, context, call_next):
        reply = call_next(message, context)
        record = context.state.array_records.get(SCAFFOLD_STATE)
        if record is not None:
            store[context.node_id] = [record[str(i)].copy() for i in range(len(record))]
        return reply

    return spy


def test_scaffold_variates_persist_in_client_state_and_c_is_their_mean():
    variates: dict[str, list[np.ndarray]] = {}
    strategy = Scaffold(**fedavg_args())
    hist, models = simulate(strategy, rounds=4, mods=[spying(variates), scaffold_mod])
    assert all(r["fit"]["num_failures"] == 0 for r in hist.rounds[1:])
    assert len(variates) > 3  # partial participation: several clients have trained
    # c <- c + sum(delta c_i) / N keeps c the mean of all N clients' c_i (0 if never sampled)
    # only if every client's c_i survived between its rounds.
    zeros = [np.zeros_like(c) for c in strategy.control_variate]
    mean = [
        sum(variates.get(str(k), zeros)[i] for k in range(CLIENTS)) / CLIENTS
        for i in range(len(zeros))
    ]
    for c, m in zip(strategy.control_variate, mean, strict=True):
        assert np.abs(c).max() > 1e-3
        np.testing.assert_allclose(c, m, rtol=1e-5, atol=1e-6)
    assert [a.dtype for a in models[-1]] == [np.float32, np.float32]


def test_scaffold_first_round_is_fedavg():
    _, scaffold = simulate(Scaffold(**fedavg_args()), rounds=1, mods=[scaffold_mod])
    _, fedavg = simulate(FedAvg(**fedavg_args()), rounds=1)
    for a, b in zip(scaffold[0], fedavg[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_scaffold_without_the_client_mod_fails_clearly():
    hist, _ = simulate(Scaffold(**fedavg_args()), rounds=1)
    fit = hist.rounds[-1]
    assert fit["fit"]["num_results"] == 0
    assert all("scaffold_mod" in f["reason"] for f in fit["failures"])


def test_scaffold_refuses_replies_without_the_variate_delta():
    from fedhive.common import FitRes, InvalidUpdate, RecordDict, Status
    from fedhive.server.client_manager import ClientProxy

    strategy = Scaffold()
    agg = strategy.fit_aggregator(1, ndarrays_to_parameters([np.zeros(2)]))
    with pytest.raises(InvalidUpdate, match="scaffold_mod"):
        agg.add(ClientProxy("0"), FitRes(Status(), ndarrays_to_parameters([np.ones(2)]), 1, {}))
    appended = ndarrays_to_parameters([np.ones(2), np.zeros(2)])  # the former wire format
    with pytest.raises(InvalidUpdate, match="scaffold_mod"):
        agg.add(ClientProxy("0"), FitRes(Status(), appended, 1, {}))
    bad = RecordDict({"scaffold": {"0": np.full(2, np.inf)}})
    model = ndarrays_to_parameters([np.ones(2)])
    with pytest.raises(InvalidUpdate, match="NaN or Inf"):
        agg.add(ClientProxy("0"), FitRes(Status(), model, 1, {}, extras=bad))
    assert agg.finalize() == (None, {})
    assert strategy.control_variate is None


# -- checkpoint and resume --------------------------------------------------------------------


class StopAfter(RoundCallback):
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round_end(self, engine, record):
        if record["round"] == self.rnd:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("make", "mods"),
    [
        (lambda: FedAdam(eta=0.05, tau=1e-3, **fedavg_args()), ()),
        (lambda: FedAvgM(server_momentum=0.9, **fedavg_args()), ()),
        (lambda: Scaffold(server_learning_rate=0.8, **fedavg_args()), (scaffold_mod,)),
    ],
    ids=["fedadam", "fedavgm", "scaffold"],
)
def test_resumed_run_continues_identically(tmp_path, make, mods):
    full, full_models = simulate(make(), rounds=4, mods=mods, checkpoint_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        simulate(
            make(), rounds=4, mods=mods, checkpoint_dir=tmp_path / "b", callbacks=[StopAfter(2)]
        )
    resumed, models = simulate(
        make(), rounds=4, mods=mods, checkpoint_dir=tmp_path / "b", resume=True
    )
    assert resumed.without_timings() == full.without_timings()
    for a, b in zip(models[-1], full_models[-1], strict=True):
        np.testing.assert_array_equal(a, b)


# -- the reference client and training loops ----------------------------------------------


def test_sim_client_follows_proximal_mu_and_reports_steps():
    client = FACTORY(fl.client.Context(node_id="0", node_config={"partition-id": 0}, seed=5))
    start = SPEC.initial(0)
    free, n, metrics = client.fit(start, dict(FIT_CONFIG))
    held, _, _ = client.fit(start, {**FIT_CONFIG, "proximal_mu": 3.0})
    assert isinstance(client, SimClient) and n == 18
    assert metrics["num_steps"] == 2 * 3  # 18 samples, batches of 8, 2 epochs
    moved = lambda new: sum(float(np.sum((a - b) ** 2)) for a, b in zip(new, start, strict=True))  # noqa: E731
    assert moved(held) < 0.2 * moved(free)


def test_sim_client_refuses_a_scaffold_round_without_the_mod():
    client = FACTORY(fl.client.Context(node_id="0", node_config={"partition-id": 0}))
    with pytest.raises(ConfigError, match="scaffold_mod"):
        client.fit(SPEC.initial(0), {**FIT_CONFIG, "scaffold": True})


def test_numpy_train_adds_the_correction_to_every_gradient():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 4)), rng.integers(0, 3, size=10)
    w = numpy_lr.init_params(4, 3, seed=1, dtype=np.float64)
    corr = [rng.normal(size=(4, 3)), rng.normal(size=3)]
    kw = dict(epochs=1, batch_size=0, lr=0.5, seed=0)
    plain, _ = numpy_lr.train(w, x, y, **kw)
    shifted, _ = numpy_lr.train(w, x, y, correction=corr, **kw)
    for a, b, c in zip(shifted, plain, corr, strict=True):
        np.testing.assert_allclose(a, b - 0.5 * c, rtol=1e-12)
    with pytest.raises(ConfigError, match="correction"):
        numpy_lr.train(w, x, y, correction=[corr[0]], **kw)


def test_torch_train_adds_the_correction_to_every_gradient():
    torch_models = pytest.importorskip("fedhive.models.torch_models")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 4)).astype(np.float32), rng.integers(0, 3, size=10)
    model = torch_models.MLP(4, (), 3, seed=0)
    start = torch_models.get_weights(model)
    corr = [rng.normal(size=a.shape).astype(np.float32) for a in start]
    kw = dict(epochs=1, batch_size=0, lr=0.5, seed=0)
    torch_models.train_torch(model, x, y, **kw)
    plain = torch_models.get_weights(model)
    torch_models.set_weights(model, start)
    torch_models.train_torch(model, x, y, correction=corr, **kw)
    for a, b, c in zip(torch_models.get_weights(model), plain, corr, strict=True):
        np.testing.assert_allclose(a, b - 0.5 * c, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="correction"):
        torch_models.train_torch(model, x, y, correction=corr[:1], **kw)
