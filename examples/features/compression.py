"""Update compression: the same federation with and without top-k sparsification (1 in
10 values sent, with error feedback), and the bytes each sends::

    python examples/features/compression.py --num-clients 10 --rounds 10

``compression=`` takes a codec (``TopK``, ``RandomK``, ``QSGD``, ``EDEN``, ``Sign``,
``FP16``, ``BF16``); the clients get the matching mod, and the history counts the bytes
that went over the wire.
"""

from __future__ import annotations

import argparse

from _task import accuracies, client_fn_for, fedavg_args, mlp, partition

import fedhive as fl


def run(num_clients: int, rounds: int, compression) -> fl.server.History:
    strategy = fl.server.strategy.FedAvg(fraction_fit=0.5, min_fit_clients=2, **fedavg_args(mlp))
    return fl.simulation.start_simulation(
        client_fn=client_fn_for(mlp, partition(num_clients)),
        num_clients=num_clients,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
        compression=compression,
        seed=0,
    )


def main(argv: list[str] | None = None) -> dict[str, fl.server.History]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args(argv)
    runs = {
        "none": run(args.num_clients, args.rounds, None),
        f"top-k {args.ratio}": run(
            args.num_clients,
            args.rounds,
            fl.compression.TopK(ratio=args.ratio, error_feedback=True),
        ),
    }
    print(f"{'compression':<14} {'bytes up':>12} {'bytes down':>12} {'final accuracy':>15}")
    for name, history in runs.items():
        totals = history.bytes_totals()
        print(
            f"{name:<14} {totals['bytes_up']:>12,} {totals['bytes_down']:>12,} "
            f"{accuracies(history)[-1]:>15.3f}"
        )
    return runs


if __name__ == "__main__":
    main()
