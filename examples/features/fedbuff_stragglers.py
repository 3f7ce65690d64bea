"""Stragglers and asynchronous aggregation: clients with log-normal compute times on the
virtual clock, trained by synchronous FedAvg (every round waits for its slowest client)
and by FedBuff (a model every ``buffer_size`` results, stale ones down-weighted)::

    python examples/features/fedbuff_stragglers.py --num-clients 20 --rounds 20

Both runs are seeded simulations on a virtual clock, so the simulated times printed are
the same on any machine; ``virtual_time_s`` of each round is in the history.
"""

from __future__ import annotations

import argparse

from _task import accuracies, client_fn_for, fedavg_args, mlp, partition

import fedhive as fl
from fedhive.simulation import SystemModel


def run(strategy, num_clients: int, rounds: int) -> fl.server.History:
    parts = partition(num_clients, alpha=1.0)
    system = SystemModel(
        latency="lognormal",
        sigma=1.0,
        num_examples={str(i): len(rows) for i, rows in enumerate(parts)},
    )
    return fl.simulation.start_simulation(
        client_fn=client_fn_for(mlp, parts),
        num_clients=num_clients,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
        system=system,
        seed=0,
    )


def main(argv: list[str] | None = None) -> dict[str, fl.server.History]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of FedAvg")
    parser.add_argument(
        "--versions", type=int, default=None, help="model versions of FedBuff (default 3x rounds)"
    )
    args = parser.parse_args(argv)
    per_round = max(2, args.num_clients // 4)
    sync = fl.server.strategy.FedAvg(
        fraction_fit=per_round / args.num_clients, min_fit_clients=per_round, **fedavg_args(mlp)
    )
    fedbuff = fl.server.strategy.FedBuff(
        buffer_size=per_round, concurrency=2 * per_round, **fedavg_args(mlp)
    )
    runs = {"FedAvg (sync)": run(sync, args.num_clients, args.rounds)}
    runs["FedBuff"] = run(fedbuff, args.num_clients, args.versions or 3 * args.rounds)
    print(f"{'strategy':<14} {'versions':>8} {'simulated s':>12} {'final accuracy':>15}")
    for name, history in runs.items():
        last = history.rounds[-1]
        print(
            f"{name:<14} {last['round']:>8} {last['virtual_time_s']:>12.1f} "
            f"{accuracies(history)[-1]:>15.3f}"
        )
    return runs


if __name__ == "__main__":
    main()
