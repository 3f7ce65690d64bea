"""FedProx with stragglers (Li et al. 2020, Figure 1, Synthetic(1,1)): FedAvg vs FedProx.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020. Setting of the paper's synthetic experiments: Synthetic(1, 1)
(``fedhive.data.synthetic``, 30 devices, natural partition: one client per device),
10 devices per round, E = 20 local epochs, minibatches of B = 10, learning rate 0.01,
multinomial logistic regression in numpy (``fedhive.models.numpy_lr``, the CLI's
``SimClient``), plain SGD.

Each round, a fraction (0%, 50%, 90%) of the 10 selected devices are stragglers: each one
is given ``x ~ U{1, ..., E - 1}`` epochs (it cannot finish E). Which devices straggle and
their ``x`` are drawn from an RNG seeded by (seed, round), so every method sees the same
stragglers. FedAvg drops the stragglers (only the devices that finish E epochs are
averaged); FedProx keeps their partial work and averages everyone, with the proximal term
``mu/2 ||w - w_t||^2`` (mu = 0: partial work only; mu = 1: the paper's choice for this
data set). At 0% stragglers FedProx mu = 0 is FedAvg (same computation), so it is not run.

Reported: the training loss (mean cross-entropy over all devices' training samples, the
global objective ``f(w) = sum_k p_k F_k(w)``) and the test accuracy of the global model
after the last round, median over 3 seeds. The data set is fixed (generated with seed
0); a seed changes the model initialisation, the device sampling, the stragglers and the
minibatch order.

Pass rule: at 50% and 90% stragglers FedProx (mu = 1) ends with a lower training loss than
FedAvg and a test accuracy at least FedAvg's.

Run::

    .venv/bin/python benchmarks/fedprox_stragglers.py            # 200 rounds, 3 seeds
    .venv/bin/python benchmarks/fedprox_stragglers.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from _repro import PerClient, Report, Track, log, median, results_path, table, with_config
from fedhive.cli.experiment import ClientFactory, ModelSpec
from fedhive.common.records import FitIns, NDArrays, Scalar, ndarrays_to_parameters
from fedhive.data import Dataset, load_dataset, natural
from fedhive.models import numpy_lr
from fedhive.server.client_manager import ClientProxy
from fedhive.server.config import ServerConfig
from fedhive.server.strategy import FedAvg, FedProx, Strategy
from fedhive.simulation import start_simulation

PER_ROUND = 10
LR, BATCH = 0.01, 10


@dataclass(frozen=True)
class Setup:
    rounds: int
    epochs: int
    seeds: int
    stragglers: tuple[float, ...]


FULL = Setup(rounds=200, epochs=20, seeds=3, stragglers=(0.0, 0.5, 0.9))
QUICK = Setup(rounds=4, epochs=2, seeds=1, stragglers=(0.0, 0.5, 0.9))


@dataclass(frozen=True)
class Method:
    name: str
    mu: float | None  # None: FedAvg, which drops the stragglers

    @property
    def drops(self) -> bool:
        return self.mu is None


METHODS = (Method("FedAvg", None), Method("FedProx mu=0", 0.0), Method("FedProx mu=1", 1.0))


def straggle(fraction: float, epochs: int, drop: bool):
    """The per-round edit: ``round(fraction * n)`` stragglers get ``U{1..E-1}`` epochs."""

    def edit(
        rng: np.random.Generator, instructions: list[tuple[ClientProxy, FitIns]]
    ) -> list[tuple[ClientProxy, FitIns]]:
        n = len(instructions)
        k = round(fraction * n)
        chosen = rng.choice(n, size=k, replace=False)
        partial = dict(zip(chosen.tolist(), rng.integers(1, epochs, size=k).tolist(), strict=True))
        out = []
        for i, (proxy, ins) in enumerate(instructions):
            if i not in partial:
                out.append((proxy, ins))
            elif not drop:
                out.append((proxy, with_config(ins, local_epochs=int(partial[i]))))
        return out

    return edit


def load() -> tuple[Dataset, ClientFactory, ModelSpec]:
    data = load_dataset("synthetic", alpha=1.0, beta=1.0, num_devices=30, seed=0)
    if data.client_ids_train is None:
        raise RuntimeError("Synthetic(1,1) has no device ids")
    part = natural(data.client_ids_train)
    splits = [(idx, np.empty(0, dtype=np.int64)) for idx in part.indices]
    spec = ModelSpec("logreg", int(data.x_train.shape[1]), data.num_classes, 1)
    return data, ClientFactory(spec, data.x_train, data.y_train, splits), spec


def run_once(
    data: Dataset,
    factory: ClientFactory,
    spec: ModelSpec,
    method: Method,
    fraction: float,
    setup: Setup,
    seed: int,
) -> tuple[float, float]:
    """(training loss, test accuracy) of the global model after the last round."""
    fit_config: dict[str, Scalar] = {
        "local_epochs": setup.epochs,
        "batch_size": BATCH,
        "lr": LR,
        "momentum": 0.0,
    }

    def evaluate_fn(
        rnd: int, params: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if rnd != setup.rounds:
            return None
        train_loss, _ = numpy_lr.evaluate(params, data.x_train, data.y_train)
        test_loss, acc = numpy_lr.evaluate(params, data.x_test, data.y_test)
        return test_loss, {"accuracy": acc, "train_loss": train_loss}

    num_clients = len(factory.splits)
    args = {
        "fraction_fit": PER_ROUND / num_clients,
        "fraction_evaluate": 0.0,
        "min_fit_clients": PER_ROUND,
        "min_available_clients": num_clients,
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": lambda rnd: dict(fit_config),
        "initial_parameters": ndarrays_to_parameters(spec.initial(seed)),
        # FedAvg at 90% stragglers may average a single device: that is the point
        "accept_failures": False,
    }
    inner: Strategy = (
        FedAvg(**args) if method.mu is None else FedProx(proximal_mu=method.mu, **args)
    )
    track = Track()
    start_simulation(
        client_fn=factory,
        num_clients=num_clients,
        config=ServerConfig(num_rounds=setup.rounds),
        strategy=PerClient(inner, straggle(fraction, setup.epochs, method.drops), seed),
        num_workers=1,
        seed=seed,
        callbacks=[track],
    )
    return track.last("train_loss"), track.last("accuracy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 rounds, E = 2")
    parser.add_argument("--rounds", type=int, default=None, help="default 200 (--quick: 4)")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--out", default=None, help="report file [results/<name>.txt]")
    parser.add_argument("--check", action="store_true", help="exit 1 if the pass rule fails")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    base = QUICK if args.quick else FULL
    setup = Setup(
        args.rounds or base.rounds, base.epochs, args.seeds or base.seeds, base.stragglers
    )
    report = Report(__file__, results_path("fedprox_stragglers", args.quick, args.out))
    data, factory, spec = load()

    start = time.perf_counter()
    results: dict[tuple[float, str], list[tuple[float, float]]] = {}
    for fraction in setup.stragglers:
        for method in METHODS:
            if fraction == 0.0 and method.mu == 0.0:
                continue  # identical to FedAvg without stragglers
            runs = results.setdefault((fraction, method.name), [])
            for seed in range(setup.seeds):
                t = time.perf_counter()
                runs.append(run_once(data, factory, spec, method, fraction, setup, seed))
                log(
                    f"{fraction:.0%} stragglers {method.name:13} seed {seed}: loss "
                    f"{runs[-1][0]:.4f} acc {runs[-1][1]:.4f} ({time.perf_counter() - t:.0f} s)"
                )
    total = time.perf_counter() - start

    def med(fraction: float, name: str) -> tuple[float, float]:
        runs = results[fraction, name]
        return median([r[0] for r in runs]), median([r[1] for r in runs])

    rows = []
    for fraction in setup.stragglers:
        for method in METHODS:
            key = (fraction, method.name)
            if key not in results:
                rows.append([f"{fraction:.0%}", method.name, "= FedAvg", "", "", ""])
                continue
            loss, acc = med(*key)
            per_seed = results[key]
            rows.append(
                [
                    f"{fraction:.0%}",
                    method.name,
                    f"{loss:.4f}",
                    f"{acc:.4f}",
                    " ".join(f"{r[0]:.3f}" for r in per_seed),
                    " ".join(f"{r[1]:.3f}" for r in per_seed),
                ]
            )
    n_train, n_test = len(data.y_train), len(data.y_test)
    report(
        f"FedProx with stragglers (Li et al. 2020, Fig. 1), Synthetic(1,1): training loss and "
        f"test accuracy after {setup.rounds} rounds, median of {setup.seeds} seed(s)"
    )
    report(
        f"30 devices ({n_train} train / {n_test} test samples, natural partition), "
        f"{PER_ROUND} per round, E = {setup.epochs}, B = {BATCH}, lr = {LR}, multinomial "
        "logistic regression (numpy), plain SGD"
    )
    report("Stragglers run U{1..E-1} epochs; FedAvg drops them, FedProx keeps their partial work.")
    report()
    headers = ["stragglers", "method", "train loss", "test acc", "loss/seed", "acc/seed"]
    report(table(headers, rows))

    ok = True
    report()
    for fraction in (0.5, 0.9):
        if fraction not in setup.stragglers:
            continue
        avg_loss, avg_acc = med(fraction, "FedAvg")
        prox_loss, prox_acc = med(fraction, "FedProx mu=1")
        good = prox_loss < avg_loss and prox_acc >= avg_acc
        ok &= good
        report(
            f"{'PASS' if good else 'FAIL'}: {fraction:.0%} stragglers: FedProx mu=1 loss "
            f"{prox_loss:.4f} {'<' if prox_loss < avg_loss else '>='} FedAvg {avg_loss:.4f}, "
            f"accuracy {prox_acc:.4f} {'>=' if prox_acc >= avg_acc else '<'} {avg_acc:.4f}"
        )
    report(f"Pass rule (FedProx mu=1 beats FedAvg at 50% and 90%): {'PASS' if ok else 'FAIL'}")
    report(f"Total wall time: {total:.0f} s")
    report.finish(argv)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
