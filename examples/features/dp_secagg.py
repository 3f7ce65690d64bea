"""Differential privacy with secure aggregation: each client clips its update
(``fixedclipping_mod``), SecAgg+ masks it so the server sees only the sum, and the
server adds Gaussian noise to that sum; the accountant reports epsilon every round::

    python examples/features/dp_secagg.py --num-clients 10 --rounds 10

The server never holds an individual update, and the released models are (epsilon,
delta)-DP for each client's whole data set (``docs/privacy.md``,
``docs/secure_aggregation.md``). With ten clients the noise that a small epsilon needs
would drown the updates, so the defaults show the mechanics at a large epsilon: a useful
guarantee takes thousands of clients per round (``fedhive privacy`` computes the noise
for a target epsilon).
"""

from __future__ import annotations

import argparse

from _task import accuracies, client_fn_for, fedavg_args, mlp, partition

import fedhive as fl
from fedhive.privacy import (
    Accounting,
    DifferentialPrivacyClientSideFixedClipping,
    fixedclipping_mod,
)


def main(argv: list[str] | None = None) -> fl.server.History:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--noise-multiplier", type=float, default=0.5)
    parser.add_argument("--clipping-norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    sampled = max(3, args.num_clients // 2)
    inner = fl.server.strategy.FedAvg(
        fraction_fit=sampled / args.num_clients,
        min_fit_clients=sampled,
        **fedavg_args(mlp, local_epochs=2),
    )
    strategy = DifferentialPrivacyClientSideFixedClipping(
        inner,
        noise_multiplier=args.noise_multiplier,
        clipping_norm=args.clipping_norm,
        num_sampled_clients=sampled,
        accounting=Accounting(delta=1e-3),
    )
    history = fl.simulation.start_simulation(
        client_fn=client_fn_for(mlp, partition(args.num_clients)),
        num_clients=args.num_clients,
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        mods=[fixedclipping_mod],
        secure_aggregation={"bits": 16, "clip": args.clipping_norm},
        seed=0,
    )
    epsilon = dict(history.metrics_distributed_fit["epsilon"])
    for server_round, accuracy in enumerate(accuracies(history)):
        spent = f"  epsilon {epsilon[server_round]:.2f}" if server_round in epsilon else ""
        print(f"round {server_round}: test accuracy {accuracy:.3f}{spent}")
    return history


if __name__ == "__main__":
    main()
