"""Personalization on strongly skewed clients (Dirichlet 0.1): FedPer keeps the output
layer on each client, and every client measures its own model and the global one on
its own test data::

    python examples/features/personalization.py --num-clients 10 --rounds 10

``method`` may be any of none, finetune, fedper, fedrep, fedbn, ditto, apfl
(``docs/personalization.md``).
"""

from __future__ import annotations

import argparse

from _task import DATA, mlp, partition

import fedhive as fl
from fedhive.data.partition import Partition, client_splits
from fedhive.personalization import (
    PersonalizationConfig,
    PersonalizationReport,
    PersonalizedTorchClient,
)


def main(argv: list[str] | None = None) -> fl.server.History:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--method", default="fedper")
    args = parser.parse_args(argv)
    layers = ("2",) if args.method in ("fedper", "fedrep") else ()  # the output layer
    config = PersonalizationConfig(method=args.method, personal_layers=layers)
    splits = client_splits(
        Partition(partition(args.num_clients, alpha=0.1)),
        val_fraction=0.1,
        test_fraction=0.2,
        seed=0,
    )
    x, y = DATA.x_train, DATA.y_train

    def client_fn(context: fl.client.Context) -> fl.client.Client:
        part = splits[int(context.node_config["partition-id"])]
        return PersonalizedTorchClient(
            mlp(),
            config,
            train=(x[part.train], y[part.train]),
            val=(x[part.val], y[part.val]),
            test=(x[part.test], y[part.test]),
        ).to_client()

    strategy = fl.server.strategy.FedAvg(
        fraction_fit=0.5,
        min_fit_clients=2,
        fraction_evaluate=1.0,
        on_fit_config_fn=lambda server_round: {"local_epochs": 1},
    )
    history = fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=args.num_clients,
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        callbacks=[PersonalizationReport()],
        seed=0,
    )
    print(f"{'round':>5} {'personalized':>13} {'global':>8}   (mean test accuracy over clients)")
    for record in history.rounds:
        if "personalized" in record:
            p, g = record["personalized"]["mean"], record["global"]["mean"]
            print(f"{record['round']:>5} {p:>13.3f} {g:>8.3f}")
    return history


if __name__ == "__main__":
    main()
