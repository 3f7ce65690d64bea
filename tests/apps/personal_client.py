"""A deployed FedPer client process: personal head kept in a state directory.

Run as a script (``--state-dir``: the client's own), or as ``fedhive client --app
personal_client:client_fn --state-dir DIR`` (the state lives in ``context.state``, which
``fedhive client`` keeps in DIR).
"""

from __future__ import annotations

import argparse

import numpy as np

import fedhive as fl
from fedhive.models.torch_models import CNN1D
from fedhive.personalization import PersonalizationConfig, PersonalizedTorchClient

CONFIG = PersonalizationConfig(method="fedper", personal_layers=("head",))


def model() -> CNN1D:
    return CNN1D(10, length=40, channels=4, seed=0)


def data(pid: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + pid)
    centres = np.random.default_rng(0).normal(scale=2.0, size=(10, 40))
    y = rng.choice([pid % 10, (pid + 3) % 10], size=120)
    x = (centres[y] + rng.normal(size=(120, 40))).astype(np.float32)
    return x, y


def client_fn(context: fl.client.Context) -> fl.client.Client:
    """Site 1's client, for ``fedhive client --app``."""
    x, y = data(1)
    return PersonalizedTorchClient(
        model(),
        CONFIG,
        train=(x[:80], y[:80]),
        val=(x[80:100], y[80:100]),
        test=(x[100:], y[100:]),
    ).to_client()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--pid", type=int, default=0)
    ap.add_argument("--state-dir", required=True)
    args = ap.parse_args()
    x, y = data(args.pid)

    def client_fn(context: fl.client.Context) -> fl.client.Client:
        return PersonalizedTorchClient(
            model(),
            CONFIG,
            train=(x[:80], y[:80]),
            val=(x[80:100], y[80:100]),
            test=(x[100:], y[100:]),
            state_dir=args.state_dir,
        ).to_client()

    fl.client.start_client(
        server_address=args.address, client_fn=client_fn, node_id=args.node_id, insecure=True
    )


if __name__ == "__main__":
    main()
