"""A Keras 3 client for fedhive (PyTorch backend), in the NumPyClient style.

    pip install keras          # Keras 3; runs on the PyTorch that fedhive already uses
    python examples/keras/server.py                       # one terminal
    python examples/keras/client.py --partition-id 0      # two more terminals
    python examples/keras/client.py --partition-id 1

The model's weights travel as ``model.get_weights()`` and come back through
``model.set_weights()``; local training is ``model.fit(x, y, epochs=1)``. The data are
scikit-learn's 8x8 digits, dealt out IID to ``--num-partitions`` clients.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

import keras

import fedhive as fl
from fedhive.data import load_dataset
from fedhive.data.partition import iid


def make_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


class KerasClient(fl.client.NumPyClient):
    def __init__(self, model, x_train, y_train, x_test, y_test) -> None:
        self.model = model
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test

    def get_parameters(self, config):
        return self.model.get_weights()

    def fit(self, parameters, config):
        self.model.set_weights(parameters)
        epochs = int(config.get("local_epochs", 1))
        hist = self.model.fit(self.x_train, self.y_train, epochs=epochs, batch_size=32, verbose=0)
        return (
            self.model.get_weights(),
            len(self.x_train),
            {"loss": float(hist.history["loss"][-1])},
        )

    def evaluate(self, parameters, config):
        self.model.set_weights(parameters)
        loss, accuracy = self.model.evaluate(self.x_test, self.y_test, verbose=0)
        return float(loss), len(self.x_test), {"accuracy": float(accuracy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:8080", help="the server's HOST:PORT")
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--num-partitions", type=int, default=2)
    parser.add_argument("--root-certificates", help="CA certificate (PEM): connect with TLS")
    args = parser.parse_args()

    keras.utils.set_random_seed(args.partition_id)
    data = load_dataset("digits", seed=0)
    mine = iid(len(data.y_train), args.num_partitions, seed=0).indices[args.partition_id]
    cut = len(mine) // 10  # a tenth of this site's data is kept for evaluation
    x, y = data.x_train[mine], data.y_train[mine]
    client = KerasClient(make_model(), x[cut:], y[cut:], x[:cut], y[:cut])
    fl.client.start_numpy_client(
        server_address=args.server, client=client, root_certificates=args.root_certificates
    )


if __name__ == "__main__":
    main()
