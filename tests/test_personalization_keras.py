"""A Keras model personalised end to end (KERAS_BACKEND=torch): FedPer in simulation
uploads only the body and beats the global model on each client's own split; FedRep's
phases freeze what they should; Ditto with lambda = inf is the global model."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("torch")
keras = pytest.importorskip("keras")

from fedhive.common.errors import ConfigError  # noqa: E402
from fedhive.common.records import FitRes, ndarrays_to_parameters  # noqa: E402
from fedhive.data.partition import client_splits, shards  # noqa: E402
from fedhive.personalization import (  # noqa: E402
    PersonalizationConfig,
    PersonalizationReport,
    PersonalizedKerasClient,
    report,
)
from fedhive.personalization.training import TrainSettings  # noqa: E402
from fedhive.server.config import ServerConfig  # noqa: E402
from fedhive.server.strategy import FedAvg  # noqa: E402
from fedhive.simulation import start_simulation  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # importing Keras is slow
    pytest.mark.timeout(900),
    # Keras 3's torch backend converts tensors with np.array(copy=False) internally
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]

NUM_CLIENTS = 6
FIT = {"local_epochs": 2, "batch_size": 10, "lr": 0.1, "momentum": 0.0}
HEAD = ("*/head/*",)


def _data(n: int = 900, dim: int = 20):
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(10, dim))
    y = rng.integers(0, 10, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


X, Y = _data()
SPLITS = client_splits(
    shards(Y, NUM_CLIENTS, 2, seed=0), val_fraction=0.1, test_fraction=0.2, seed=0
)


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((X.shape[1],)),
            keras.layers.Dense(16, activation="relu", name="body"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Dense(10, name="head"),
        ]
    )


def _client(config, cid, model=None, **kw):
    part = SPLITS[cid]
    return PersonalizedKerasClient(
        model if model is not None else _model(),
        config,
        train=(X[part.train], Y[part.train]),
        test=(X[part.test], Y[part.test]),
        val=(X[part.val], Y[part.val]),
        **kw,
    )


class Spy:
    def __init__(self):
        self.uploads: list[FitRes] = []

    def __call__(self, message, context, call_next):
        reply = call_next(message, context)
        if isinstance(reply.content, FitRes):
            self.uploads.append(reply.content)
        return reply


def test_keras_fedper_end_to_end():
    config = PersonalizationConfig(method="fedper", personal_layers=HEAD)
    net = _model()
    initial = [np.array(w) for w in net.get_weights()]
    split = _client(config, 0, model=net).split
    assert [split.names[i] for i in split.personal] == [
        n for n in split.names if "/head/" in n
    ]  # the head's kernel and bias
    spy = Spy()

    def client_fn(context):
        return _client(config, int(context.node_id), model=net, initial=initial)

    strategy = FedAvg(
        fraction_fit=0.5,
        min_fit_clients=3,
        min_evaluate_clients=NUM_CLIENTS,
        initial_parameters=ndarrays_to_parameters(split.shared(initial)),
        on_fit_config_fn=lambda rnd: dict(FIT),
    )
    history = start_simulation(
        client_fn=client_fn,
        num_clients=NUM_CLIENTS,
        strategy=strategy,
        config=ServerConfig(num_rounds=4),
        seed=3,
        mods=[spy],
        callbacks=[PersonalizationReport()],
    )
    shared = [initial[i].shape for i in split.shared_indices]
    assert len(spy.uploads) == 12
    for res in spy.uploads:  # the head never leaves a client
        assert [a.shape for a in res.parameters.arrays] == shared
    figures = report(history)["last"]
    assert figures["personalized"]["mean"] > figures["global"]["mean"] + 0.15, figures
    rows = history.rounds[-1]["personalized"]["clients"]
    assert {r["client_id"] for r in rows} == {str(i) for i in range(NUM_CLIENTS)}


def test_keras_fedrep_phases_freeze_the_other_part():
    config = PersonalizationConfig(method="fedrep", personal_layers=HEAD)
    client = _client(config, 1)
    net, trainer, x, y = client._model_fn(), client.trainer, *client.train
    head = set(client.split.personal_names)
    start = client.initial
    settings = TrainSettings(epochs=0, batch_size=10, lr=0.1)
    after_head, _ = trainer.train_fedrep(net, start, head, x, y, settings, 0, head_epochs=1)
    moved = [not np.array_equal(a, b) for a, b in zip(start, after_head, strict=True)]
    trainable_body = [i for i in client.split.shared_indices if net.weights[i].trainable]
    assert all(moved[i] for i in client.split.personal)
    assert not any(moved[i] for i in trainable_body)
    settings = TrainSettings(epochs=1, batch_size=10, lr=0.1)
    after_body, _ = trainer.train_fedrep(net, start, head, x, y, settings, 0, head_epochs=0)
    moved = [not np.array_equal(a, b) for a, b in zip(start, after_body, strict=True)]
    assert not any(moved[i] for i in client.split.personal)
    assert all(moved[i] for i in trainable_body)
    assert len(net.trainable_weights) == 6  # the flags are restored


def test_keras_ditto_with_infinite_lambda_is_the_global_model_and_apfl_is_refused():
    params = _client(PersonalizationConfig(), 2).get_parameters({})
    for lam in (float("inf"), 1e9):  # 1e9: the proximal step itself pins v to w
        client = _client(PersonalizationConfig(method="ditto", lam=lam), 2)
        client.fit(params, dict(FIT))
        personal = client.personal_model(params)
        # the trainable weights (batch norm's moving statistics are not anchored: they
        # follow the client's data, as in the torch client)
        trainable = [i for i, v in enumerate(client._model_fn().weights) if v.trainable]
        assert len(trainable) == 6
        assert all(np.allclose(personal[i], params[i], atol=1e-5) for i in trainable)
        if lam == float("inf"):
            _, _, metrics = client.evaluate(params, {})
            assert metrics["p_test_loss"] == pytest.approx(metrics["g_test_loss"], rel=1e-4)
    free = _client(PersonalizationConfig(method="ditto", lam=0.0), 2)
    free.fit(params, dict(FIT))
    _, _, metrics = free.evaluate(params, {})
    assert metrics["p_test_loss"] < metrics["g_test_loss"]  # trained on its own data
    with pytest.raises(ConfigError, match="not available for PersonalizedKerasClient"):
        _client(PersonalizationConfig(method="apfl"), 0)
