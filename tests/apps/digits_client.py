"""A client process that trains logistic regression on its share of scikit-learn's digits
(Flower 1.x style: a NumPyClient and start_numpy_client)."""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_digits

import fedhive as fl
from fedhive.models import numpy_lr


def digits(pid: int, num_clients: int):
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order] / 16.0, y[order]
    return x[:1400][pid::num_clients], y[:1400][pid::num_clients]


class DigitsClient(fl.client.NumPyClient):
    def __init__(self, pid: int, num_clients: int) -> None:
        self.pid = pid
        self.x, self.y = digits(pid, num_clients)

    def fit(self, parameters, config):
        new, info = numpy_lr.train(
            parameters, self.x, self.y, epochs=1, batch_size=10, lr=0.1, seed=self.pid
        )
        return new, len(self.x), {"loss": info["loss"]}

    def evaluate(self, parameters, config):
        loss, acc = numpy_lr.evaluate(parameters, self.x, self.y)
        return loss, len(self.x), {"accuracy": acc}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--num-clients", type=int, required=True)
    args = parser.parse_args()
    client = DigitsClient(args.pid, args.num_clients)
    fl.client.start_numpy_client(server_address=args.address, client=client)


if __name__ == "__main__":
    main()
