"""Flower's quickstart-tensorflow (Keras 3 on the PyTorch backend), legacy API.

``model.get_weights()`` / ``model.set_weights()`` carry the model; ``KERAS_BACKEND=torch``
lets Keras 3 run on the PyTorch fedhive already uses::

    pip install keras
    python examples/flower/quickstart_tensorflow.py --rounds 3
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

import keras
from _data import load_partition

import fedhive as fl
from fedhive.common import Context

NUM_PARTITIONS = 3


def make_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, model, data) -> None:
        self.model = model
        self.x_train, self.y_train, self.x_test, self.y_test = data

    def get_parameters(self, config):
        return self.model.get_weights()

    def fit(self, parameters, config):
        self.model.set_weights(parameters)
        self.model.fit(self.x_train, self.y_train, epochs=1, batch_size=32, verbose=0)
        return self.model.get_weights(), len(self.x_train), {}

    def evaluate(self, parameters, config):
        self.model.set_weights(parameters)
        loss, accuracy = self.model.evaluate(self.x_test, self.y_test, verbose=0)
        return float(loss), len(self.x_test), {"accuracy": float(accuracy)}


def client_fn(context: Context) -> fl.client.Client:
    partition_id = int(context.node_config["partition-id"])
    return FlowerClient(make_model(), load_partition(partition_id, NUM_PARTITIONS)).to_client()


def main(rounds: int = 3) -> fl.server.History:
    keras.utils.set_random_seed(0)
    history = fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=NUM_PARTITIONS,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=fl.server.strategy.FedAvg(),
        seed=0,
    )
    for rnd, loss in history.losses_distributed:
        print(f"round {rnd}: loss {loss:.3f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    main(parser.parse_args().rounds)
