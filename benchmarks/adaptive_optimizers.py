"""Adaptive server optimizers (Reddi et al. 2021) and server momentum (Hsu et al. 2019) vs
FedAvg on label-skewed MNIST-1D: rounds to a target test accuracy.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (FedAdam, FedYogi, FedAdagrad); Hsu, Qi, Brown, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification",
arXiv:1909.06335, 2019 (FedAvgM). MNIST-1D (Greydanus 2020; 20,000 samples, 16,000 train
/ 4,000 test, a fixed data set), 100 clients with a Dirichlet(0.1) label split (Hsu et
al. 2019; every client holds >= 5 samples), 10 clients per round, the MLP of the CLI's
``ModelSpec`` (40-128-10), clients run E = 1 epoch of plain SGD, B = 10, lr 0.05 (the same
for every method).

Every server optimizer works on the pseudo-gradient ``mean_i y_i - x``. Each method's
server learning rate comes from a small grid: the value needing the fewest rounds on seed
0 (ties: the higher best accuracy), then seeds 1 and 2 run with that value only. FedAvg
has no server learning rate (it is FedAvgM with lr 1, momentum 0). A seed changes the
partition, the model initialisation, the client sampling and the minibatch order. A run
stops at the first round whose centralized test accuracy reaches the target; ">cap" means
never within the cap. The table gives the median over 3 seeds.

Pass rule: the best adaptive optimizer (FedAdam, FedYogi, FedAdagrad) needs fewer rounds
than FedAvg (medians).

Run::

    .venv/bin/python benchmarks/adaptive_optimizers.py            # full: 3 seeds
    .venv/bin/python benchmarks/adaptive_optimizers.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from _repro import Report, fmt_rounds, log, median, results_path, simulate, table
from fedhive.cli.experiment import ClientFactory, ModelSpec, evaluate_params, split_clients
from fedhive.common.records import NDArrays, Scalar, ndarrays_to_parameters
from fedhive.data import Dataset, dirichlet, load_mnist1d
from fedhive.server.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

ALPHA, MIN_SIZE = 0.1, 5  # min_size 10 has no Dirichlet(0.1) draw for seed 1
CLIENT_LR, BATCH, EPOCHS = 0.05, 10, 1
TAU = 1e-3  # the adaptivity degree Reddi et al. use for most tasks


@dataclass(frozen=True)
class Setup:
    num_samples: int
    num_clients: int
    per_round: int
    target: float
    cap: int
    seeds: int


FULL = Setup(20000, 100, 10, 0.45, 300, 3)
QUICK = Setup(2000, 20, 4, 0.25, 6, 1)


@dataclass(frozen=True)
class Method:
    name: str
    grid: tuple[float, ...]  # server learning rates tried on seed 0
    make: Callable[[float, dict[str, Any]], Strategy]
    adaptive: bool


METHODS = (
    Method("FedAvg", (1.0,), lambda lr, a: FedAvg(**a), False),
    Method(
        "FedAvgM m=0.9",
        (0.1, 0.3),
        lambda lr, a: FedAvgM(server_learning_rate=lr, server_momentum=0.9, **a),
        False,
    ),
    Method(
        "FedAdam",
        (0.003, 0.01, 0.03),
        lambda lr, a: FedAdam(eta=lr, tau=TAU, variant="paper", **a),
        True,
    ),
    Method(
        "FedYogi",
        (0.003, 0.01, 0.03),
        lambda lr, a: FedYogi(eta=lr, tau=TAU, variant="paper", **a),
        True,
    ),
    Method(
        "FedAdagrad",
        (0.01, 0.03, 0.1),
        lambda lr, a: FedAdagrad(eta=lr, tau=TAU, variant="paper", **a),
        True,
    ),
)


def run_once(
    data: Dataset, setup: Setup, method: Method, lr: float, seed: int
) -> tuple[float, float]:
    """(rounds to the target or inf; best accuracy seen)."""
    k = setup.num_clients
    part = dirichlet(data.y_train, k, ALPHA, seed, min_size=MIN_SIZE)
    spec = ModelSpec("mlp", data.input_shape[0], data.num_classes, 128)
    factory = ClientFactory(spec, data.x_train, data.y_train, split_clients(part, 0.0, seed))
    fit_config: dict[str, Scalar] = {
        "local_epochs": EPOCHS,
        "batch_size": BATCH,
        "lr": CLIENT_LR,
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
    track = simulate(
        method.make(lr, args), factory, k, setup.cap, seed, target=setup.target, stop=True
    )
    best = max((float(m["accuracy"]) for _, m in track.curve), default=math.nan)
    return (math.inf if track.reached is None else float(track.reached)), best


@dataclass
class Cell:
    lr: float
    rounds: list[float]
    grid: dict[float, tuple[float, float]]
    seconds: float


def run_method(data: Dataset, setup: Setup, method: Method, grid: Sequence[float]) -> Cell:
    start = time.perf_counter()
    results: dict[float, tuple[float, float]] = {}
    for lr in grid:
        results[lr] = run_once(data, setup, method, lr, 0)
        log(f"{method.name:14} lr {lr:g} seed 0: {fmt_rounds(results[lr][0], setup.cap)} rounds")
    best = min(grid, key=lambda lr: (results[lr][0], -results[lr][1], lr))
    rounds = [results[best][0]]
    for seed in range(1, setup.seeds):
        rounds.append(run_once(data, setup, method, best, seed)[0])
        log(f"{method.name:14} lr {best:g} seed {seed}: {fmt_rounds(rounds[-1], setup.cap)} rounds")
    return Cell(best, rounds, results, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--cap", type=int, default=None, help="round cap (default 300)")
    parser.add_argument("--target", type=float, default=None, help="default 0.45")
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
    report = Report(__file__, results_path("adaptive_optimizers", args.quick, args.out))
    data = load_mnist1d(num_samples=setup.num_samples, seed=0)

    start = time.perf_counter()
    cells = {}
    for method in METHODS:
        grid = method.grid[:1] if args.quick else method.grid
        cells[method.name] = run_method(data, setup, method, grid)
    total = time.perf_counter() - start

    report(
        f"Adaptive federated optimization (Reddi et al. 2021) on MNIST-1D, Dirichlet({ALPHA}): "
        f"rounds to {setup.target:.0%} test accuracy, median of {setup.seeds} seed(s)"
    )
    report(
        f"{data.num_train} train / {data.num_test} test samples, {setup.num_clients} clients, "
        f"{setup.per_round} per round, MLP 40-128-10, clients: E = {EPOCHS}, B = {BATCH}, "
        f"SGD lr {CLIENT_LR}, momentum 0; adaptive (paper variant: v0 = tau^2, no bias "
        f"correction) tau = {TAU:g}, beta_1 = 0.9, "
        f"beta_2 = 0.99 (Adagrad: beta_1 = 0); cap {setup.cap} rounds"
    )
    report("Server learning rate: best of the grid on seed 0, then seeds 1.. with it.\n")
    rows = []
    for name, c in cells.items():
        grid = "  ".join(f"{lr:g}:{fmt_rounds(r, setup.cap)}" for lr, (r, _) in c.grid.items())
        per_seed = " ".join(fmt_rounds(r, setup.cap) for r in c.rounds)
        rows.append(
            [
                name,
                fmt_rounds(median(c.rounds), setup.cap),
                f"{c.lr:g}",
                per_seed,
                grid,
                f"{c.seconds:.0f}",
            ]
        )
    headers = ["method", "rounds (median)", "server lr", "rounds/seed", "seed 0 grid lr:rounds"]
    report(table([*headers, "s"], rows))

    fedavg = median(cells["FedAvg"].rounds)
    adaptive = {m.name: median(cells[m.name].rounds) for m in METHODS if m.adaptive}
    best_name = min(adaptive, key=lambda n: adaptive[n])
    ok = adaptive[best_name] < fedavg
    report()
    report(
        f"{'PASS' if ok else 'FAIL'}: best adaptive optimizer {best_name} needs "
        f"{fmt_rounds(adaptive[best_name], setup.cap)} rounds, FedAvg "
        f"{fmt_rounds(fedavg, setup.cap)} (rule: fewer than FedAvg)"
    )
    report(f"Total wall time: {total:.0f} s")
    report.finish(argv)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
