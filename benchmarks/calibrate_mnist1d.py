"""Calibrate the default experiment: plain FedAvg on MNIST-1D with a small 1-D CNN.

No framework: the server is a loop that samples clients, trains a copy of the global
model on each with :func:`fedhive.models.torch_models.train_torch` (a fresh SGD optimizer,
so a fresh momentum buffer, per client round) and replaces the global weights by the
average of the client weights, weighted by client data size (FedAvg, McMahan et al.
2017). Clients hold a Dirichlet(alpha) label-skewed split of the training set (Hsu et al.
2019). The global model is evaluated on the test set after every round.

Run (single-threaded torch, sequential clients)::

    PYTHONPATH=src python benchmarks/calibrate_mnist1d.py
    PYTHONPATH=src python benchmarks/calibrate_mnist1d.py --channels 32 --lr 0.02 \\
        --epochs 2 --batch-size 10 --rounds 100
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from fedhive.common.records import NDArrays
from fedhive.data import Dataset, dirichlet, load_mnist1d
from fedhive.models.torch_models import (
    CNN1D,
    evaluate_torch,
    get_weights,
    set_weights,
    train_torch,
)


@dataclass
class RoundResult:
    round: int
    accuracy: float
    loss: float
    elapsed_s: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--min-size", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--print-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--cache-dir", default=None, help="MNIST-1D cache (default ~/.cache)")
    return parser.parse_args(argv)


def client_seed(seed: int, server_round: int, client: int) -> int:
    """A distinct, reproducible seed per (run, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0])


def weighted_average(updates: list[tuple[NDArrays, int]]) -> NDArrays:
    """FedAvg: the average of the clients' arrays weighted by their example counts."""
    total = sum(n for _, n in updates)
    first = updates[0][0]
    averaged: NDArrays = []
    for i, reference in enumerate(first):
        acc = np.zeros(reference.shape, dtype=np.float64)
        for arrays, n in updates:
            acc += arrays[i].astype(np.float64) * (n / total)
        averaged.append(acc.astype(reference.dtype))
    return averaged


def run_round(
    model: CNN1D,
    global_weights: NDArrays,
    data: Dataset,
    client_indices: list[np.ndarray],
    chosen: np.ndarray,
    server_round: int,
    args: argparse.Namespace,
) -> NDArrays:
    """Train every chosen client from the global weights and average the results."""
    updates: list[tuple[NDArrays, int]] = []
    for client in chosen:
        ix = client_indices[int(client)]
        set_weights(model, global_weights)
        metrics = train_torch(
            model,
            data.x_train[ix],
            data.y_train[ix],
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            seed=client_seed(args.seed, server_round, int(client)),
        )
        updates.append((get_weights(model), int(metrics["num_examples"])))
    return weighted_average(updates)


def run(args: argparse.Namespace) -> list[RoundResult]:
    torch.set_num_threads(args.threads)
    data = load_mnist1d(args.num_samples, seed=args.seed, cache_dir=args.cache_dir)
    partition = dirichlet(
        data.y_train, args.clients, args.alpha, seed=args.seed, min_size=args.min_size
    )
    model = CNN1D(num_classes=data.num_classes, channels=args.channels, seed=args.seed)
    global_weights = get_weights(model)
    rng = np.random.default_rng(args.seed)
    results: list[RoundResult] = []
    start = time.perf_counter()
    for server_round in range(1, args.rounds + 1):
        chosen = rng.choice(args.clients, size=args.per_round, replace=False)
        global_weights = run_round(
            model, global_weights, data, partition.indices, chosen, server_round, args
        )
        set_weights(model, global_weights)
        loss, acc = evaluate_torch(model, data.x_test, data.y_test)
        results.append(RoundResult(server_round, acc, loss, time.perf_counter() - start))
        report(results[-1], args)
    return results


def report(result: RoundResult, args: argparse.Namespace) -> None:
    if result.round == 1:
        print(f"{'round':>5}  {'test_acc':>8}  {'test_loss':>9}  {'elapsed_s':>9}")
    if result.round % args.print_every == 0 or result.round == args.rounds:
        print(
            f"{result.round:>5}  {result.accuracy:>8.4f}  {result.loss:>9.4f}  "
            f"{result.elapsed_s:>9.1f}",
            flush=True,
        )


def summarize(results: list[RoundResult], args: argparse.Namespace) -> None:
    hit = next((r for r in results if r.accuracy >= args.target), None)
    best = max(results, key=lambda r: r.accuracy)
    last = results[-1]
    if hit is None:
        print(f"target {args.target:.0%} not reached in {args.rounds} rounds")
    else:
        print(f"target {args.target:.0%} first reached at round {hit.round}, {hit.elapsed_s:.1f} s")
    print(f"final accuracy {last.accuracy:.4f} at round {last.round} ({last.elapsed_s:.1f} s)")
    print(f"best accuracy {best.accuracy:.4f} at round {best.round}")
    print(f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    print("reproduce: PYTHONPATH=src python benchmarks/calibrate_mnist1d.py " + command_line(args))


def command_line(args: argparse.Namespace) -> str:
    flags = [
        f"--{name.replace('_', '-')} {shlex.quote(str(value))}"
        for name, value in vars(args).items()
        if value is not None
    ]
    return " ".join(flags)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summarize(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
