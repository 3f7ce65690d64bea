"""SCAFFOLD and FedNova vs FedAvg under pathological non-IID data and unequal local work:
rounds to a target test accuracy.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020 (Option II control variates, ``scaffold_mod``); Wang,
Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020 (FedNova, vanilla SGD: ``||a_i|| = tau_i``).

MNIST-1D (Greydanus 2020; 20,000 samples, 16,000 train / 4,000 test, fixed data set), 100
clients with the pathological split of McMahan et al. 2017 (sorted by label, 2 shards per
client: at most 2 labels each), 10 clients per round, the MLP of the CLI's ``ModelSpec``
(40-128-10), plain SGD (momentum 0), B = 10, lr 0.05. Each round every selected client
runs ``E_i ~ U{1..5}`` local epochs, drawn from an RNG seeded by (seed, round), so all
methods see the same draws: local step counts differ by client size and by ``E_i``, which
FedAvg's objective is inconsistent under and FedNova normalises. All three use server
learning rate 1 and weight clients by their number of examples.

A run stops at the first round whose centralized test accuracy reaches the target, 45%
(">cap": never within the cap, 300 rounds). The target was fixed before the comparison,
from one FedAvg run on seed 0 without a target (test accuracy 0.303, 0.454, 0.501, 0.503
at rounds 25, 100, 150, 300). Median over 3 seeds; a seed changes the partition, the model
initialisation, the client sampling, the epoch draws and the minibatch order.

Run::

    .venv/bin/python benchmarks/scaffold_fednova.py            # full: 3 seeds
    .venv/bin/python benchmarks/scaffold_fednova.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from _repro import (
    PerClient,
    Report,
    fmt_rounds,
    log,
    median,
    results_path,
    simulate,
    table,
    with_config,
)
from fedhive.cli.experiment import ClientFactory, ModelSpec, evaluate_params, split_clients
from fedhive.client.mods import scaffold_mod
from fedhive.common.records import FitIns, NDArrays, Scalar, ndarrays_to_parameters
from fedhive.data import Dataset, load_mnist1d, shards
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy import FedAvg, FedNova, Scaffold, Strategy

LR, BATCH, MAX_EPOCHS = 0.05, 10, 5
METHODS = ("FedAvg", "FedNova", "SCAFFOLD")


@dataclass(frozen=True)
class Setup:
    num_samples: int
    num_clients: int
    per_round: int
    target: float
    cap: int
    seeds: int


FULL = Setup(20000, 100, 10, 0.45, 300, 3)
QUICK = Setup(2000, 20, 4, 0.20, 5, 1)


def draw_epochs(
    rng: np.random.Generator, instructions: list[tuple[ClientProxy, FitIns]]
) -> list[tuple[ClientProxy, FitIns]]:
    """Each selected client runs ``U{1..MAX_EPOCHS}`` local epochs this round."""
    epochs = rng.integers(1, MAX_EPOCHS + 1, size=len(instructions)).tolist()
    return [
        (p, with_config(ins, local_epochs=int(e)))
        for (p, ins), e in zip(instructions, epochs, strict=True)
    ]


def make(name: str, args: dict[str, Any]) -> Strategy:
    if name == "FedNova":
        return FedNova(**args)
    if name == "SCAFFOLD":
        return Scaffold(**args)
    return FedAvg(**args)


def run_once(data: Dataset, setup: Setup, name: str, seed: int) -> tuple[float, float]:
    """(rounds to the target or inf; best accuracy seen)."""
    k = setup.num_clients
    part = shards(data.y_train, k, shards_per_client=2, seed=seed)
    spec = ModelSpec("mlp", data.input_shape[0], data.num_classes, 128)
    factory = ClientFactory(spec, data.x_train, data.y_train, split_clients(part, 0.0, seed))
    fit_config: dict[str, Scalar] = {
        "local_epochs": 1,
        "batch_size": BATCH,
        "lr": LR,
        "momentum": 0.0,
    }

    def evaluate_fn(
        rnd: int, params: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if rnd == 0:
            return None
        loss, acc = evaluate_params(spec, params, data.x_test, data.y_test)
        return loss, {"accuracy": acc}

    args: dict[str, Any] = {
        "fraction_fit": setup.per_round / k,
        "fraction_evaluate": 0.0,
        "min_fit_clients": setup.per_round,
        "min_available_clients": k,
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": lambda rnd: dict(fit_config),
        "initial_parameters": ndarrays_to_parameters(spec.initial(seed)),
    }
    strategy = PerClient(make(name, args), draw_epochs, seed)
    mods = [scaffold_mod] if name == "SCAFFOLD" else []
    track = simulate(
        strategy, factory, k, setup.cap, seed, target=setup.target, stop=True, mods=mods
    )
    best = max((float(m["accuracy"]) for _, m in track.curve), default=math.nan)
    curve = " ".join(f"{r}:{float(m['accuracy']):.3f}" for r, m in track.curve if r % 25 == 0)
    log(f"{name} seed {seed} accuracy every 25 rounds: {curve}")
    return (math.inf if track.reached is None else float(track.reached)), best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--cap", type=int, default=None, help="round cap (default 300)")
    parser.add_argument("--target", type=float, default=None, help="default 0.45")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list")
    parser.add_argument("--out", default=None, help="report file [results/<name>.txt]")
    parser.add_argument("--check", action="store_true", help="exit 1 if the pass rule fails")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    base = QUICK if args.quick else FULL
    setup = Setup(
        base.num_samples,
        base.num_clients,
        base.per_round,
        args.target or base.target,
        args.cap or base.cap,
        args.seeds or base.seeds,
    )
    report = Report(__file__, results_path("scaffold_fednova", args.quick, args.out))
    data = load_mnist1d(num_samples=setup.num_samples, seed=0)

    start = time.perf_counter()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if "FedAvg" not in methods:
        parser.error(f"--methods must include FedAvg (the baseline); choose from {METHODS}")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for seed in range(setup.seeds):
        for name in methods:
            t = time.perf_counter()
            results[name].append(run_once(data, setup, name, seed))
            rounds, best = results[name][-1]
            log(
                f"{name:9} seed {seed}: {fmt_rounds(rounds, setup.cap)} rounds, best acc "
                f"{best:.3f} ({time.perf_counter() - t:.0f} s)"
            )
    total = time.perf_counter() - start

    med = {name: median([r for r, _ in runs]) for name, runs in results.items()}
    report(
        "SCAFFOLD and FedNova vs FedAvg on MNIST-1D, 2 shards per client, "
        f"E_i ~ U{{1..{MAX_EPOCHS}}}: rounds to {setup.target:.0%} test accuracy, "
        f"median of {setup.seeds} seed(s)"
    )
    report(
        f"{data.num_train} train / {data.num_test} test samples, {setup.num_clients} clients, "
        f"{setup.per_round} per round, MLP 40-128-10, SGD lr {LR}, B = {BATCH}, momentum 0, "
        f"server lr 1; cap {setup.cap} rounds\n"
    )
    rows = []
    for name, runs in results.items():
        ratio = "" if name == "FedAvg" else _ratio(med["FedAvg"], med[name])
        rows.append(
            [
                name,
                fmt_rounds(med[name], setup.cap),
                ratio,
                " ".join(fmt_rounds(r, setup.cap) for r, _ in runs),
                " ".join(f"{b:.3f}" for _, b in runs),
            ]
        )
    headers = ["method", "rounds (median)", "FedAvg / method", "rounds/seed", "best acc/seed"]
    report(table(headers, rows))
    report()
    for name in methods[1:]:
        fewer = med[name] < med["FedAvg"]
        report(
            f"{name}: {fmt_rounds(med[name], setup.cap)} rounds vs FedAvg "
            f"{fmt_rounds(med['FedAvg'], setup.cap)} -> {'fewer' if fewer else 'not fewer'}"
        )
    report(f"Total wall time: {total:.0f} s")
    report.finish(argv)
    return 0


def _ratio(fedavg: float, other: float) -> str:
    if math.isinf(fedavg) and math.isinf(other):
        return "?"
    if math.isinf(other):
        return "<1"
    if math.isinf(fedavg):
        return "> cap/rounds"
    return f"{fedavg / other:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
