"""Privacy-utility trade-off of DP-FedAvg on MNIST-1D, against non-private FedAvg.

N clients hold an IID split of MNIST-1D (Greydanus 2020) and train multinomial logistic
regression (numpy, one local epoch of minibatch SGD per round). Each private setting uses
``DifferentialPrivacyServerSideFixedClipping`` (or the adaptive variant) around FedAvg,
Poisson sampling with expected cohort m (q = m / N) and the PLD accountant at
delta = N^-1.1. The baseline, measured in the same run, is plain FedAvg with a fixed
cohort of m clients. Every setting reports the final test accuracy, its ratio to the
baseline's, and the user-level epsilon spent.

Run::

    .venv/bin/python benchmarks/privacy_utility.py            # 1,000 clients, 100 per round
    .venv/bin/python benchmarks/privacy_utility.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np

from fedhive.client import NumPyClient
from fedhive.client.context import Context
from fedhive.common.records import NDArrays, Scalar, ndarrays_to_parameters
from fedhive.data import load_dataset
from fedhive.data import partition as partitioners
from fedhive.models import numpy_lr
from fedhive.privacy import (
    Accounting,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from fedhive.server.config import ServerConfig
from fedhive.server.strategy import FedAvg, Strategy
from fedhive.simulation import start_simulation


@dataclass(frozen=True)
class Setup:
    clients: int
    per_round: int
    rounds: int
    samples: int
    lr: float
    clip: float
    seed: int


@dataclass(frozen=True)
class Setting:
    name: str
    noise: float | None  # None: plain FedAvg
    adaptive: bool = False
    cohort: int | None = None  # expected clients per round; None: the setup's


SETTINGS = [
    Setting("FedAvg (baseline)", None),
    Setting("DP-FedAvg, clip only", 0.0),
    Setting("DP-FedAvg", 0.5),
    Setting("DP-FedAvg", 1.0),
    Setting("DP-FedAvg", 2.0),
    Setting("DP-FedAvg adaptive", 1.0, adaptive=True),
    Setting("DP-FedAvg, half cohort", 1.0, cohort=-2),
    Setting("DP-FedAvg, double cohort", 1.0, cohort=2),
]


def cohort_of(setting: Setting, setup: Setup) -> int:
    """Expected cohort size: the setup's, or that times/divided by ``setting.cohort``."""
    if setting.cohort is None:
        return setup.per_round
    if setting.cohort < 0:
        return max(1, setup.per_round // -setting.cohort)
    return min(setup.clients, setup.per_round * setting.cohort)


class LogRegClient(NumPyClient):
    def __init__(self, x: np.ndarray, y: np.ndarray, lr: float, seed: int) -> None:
        self.x, self.y, self.lr, self.seed = x, y, lr, seed

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        new, stats = numpy_lr.train(
            parameters, self.x, self.y, epochs=1, batch_size=8, lr=self.lr, seed=self.seed
        )
        return new, len(self.x), {"loss": float(stats["loss"])}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict]:
        loss, acc = numpy_lr.evaluate(parameters, self.x, self.y)
        return loss, len(self.x), {"accuracy": acc}


def build(setup: Setup) -> tuple[object, object, object]:
    data = load_dataset("mnist1d", num_samples=setup.samples, seed=setup.seed)
    mean, std = data.x_train.mean(0), data.x_train.std(0) + 1e-8
    x_train = ((data.x_train - mean) / std).astype(np.float32)
    x_test = ((data.x_test - mean) / std).astype(np.float32)
    split = partitioners.iid(len(data.y_train), setup.clients, setup.seed)

    def client_fn(context: Context) -> NumPyClient:
        idx = split.indices[int(context.node_config["partition-id"])]
        return LogRegClient(x_train[idx], data.y_train[idx], setup.lr, context.seed)

    def evaluate_fn(rnd: int, params: NDArrays, cfg: dict) -> tuple[float, dict[str, Scalar]]:
        loss, acc = numpy_lr.evaluate(params, x_test, data.y_test)
        return loss, {"accuracy": acc}

    init = numpy_lr.init_params(x_train.shape[1], data.num_classes, seed=setup.seed)
    return client_fn, evaluate_fn, init


def strategy_for(setting: Setting, setup: Setup, evaluate_fn: object, init: NDArrays) -> Strategy:
    m = cohort_of(setting, setup)
    inner = FedAvg(
        fraction_fit=m / setup.clients,
        fraction_evaluate=0.0,
        min_fit_clients=1,
        min_available_clients=1,
        evaluate_fn=evaluate_fn,  # type: ignore[arg-type]
        initial_parameters=ndarrays_to_parameters(init),
    )
    if setting.noise is None:
        return inner
    accounting = Accounting(delta=setup.clients**-1.1, sampling="poisson", method="pld")
    if setting.adaptive:
        return DifferentialPrivacyServerSideAdaptiveClipping(
            inner,
            setting.noise,
            m,
            initial_clipping_norm=setup.clip,
            clipped_count_stddev=max(m / 20, setting.noise),
            accounting=accounting,
        )
    return DifferentialPrivacyServerSideFixedClipping(
        inner, setting.noise, setup.clip, m, accounting=accounting
    )


def run(setup: Setup) -> list[tuple[Setting, float, float, float]]:
    client_fn, evaluate_fn, init = build(setup)
    rows = []
    for setting in SETTINGS:
        start = time.perf_counter()
        history = start_simulation(
            client_fn=client_fn,  # type: ignore[arg-type]
            num_clients=setup.clients,
            config=ServerConfig(num_rounds=setup.rounds),
            strategy=strategy_for(setting, setup, evaluate_fn, init),  # type: ignore[arg-type]
            seed=setup.seed,
        )
        accuracy = float(history.metrics_centralized["accuracy"][-1][1])
        eps = history.metrics_distributed_fit.get("epsilon", [(0, float("nan"))])[-1][1]
        rows.append((setting, accuracy, float(eps), time.perf_counter() - start))
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write accuracy against epsilon here")
    args = parser.parse_args(argv)
    if args.quick:
        setup = Setup(100, 20, 4, 4000, lr=0.1, clip=1.0, seed=args.seed)
    else:
        setup = Setup(args.clients, args.per_round, args.rounds, 40 * args.clients, 0.1, 1.0,
                      args.seed)  # fmt: skip
    logging.getLogger("fedhive.privacy").setLevel(logging.ERROR)  # z = 0 warns by design
    rows = run(setup)
    base = rows[0][1]
    q = setup.per_round / setup.clients
    print(
        f"MNIST-1D, logistic regression, {setup.clients} clients, m = {setup.per_round} "
        f"per round (q = {q:g}), {setup.rounds} rounds, clip C = {setup.clip}, "
        f"delta = N^-1.1 = {setup.clients**-1.1:.2g} (PLD, Poisson sampling)"
    )
    header = (
        f"{'path':<26} {'m':>5} {'z':>5} {'epsilon':>9} {'accuracy':>9} {'ratio':>7} {'time s':>7}"
    )
    print(header)
    print("-" * len(header))
    for setting, acc, eps, seconds in rows:
        z = "-" if setting.noise is None else f"{setting.noise:g}"
        eps_text = "-" if setting.noise is None else f"{eps:.3g}"
        print(
            f"{setting.name:<26} {cohort_of(setting, setup):>5} {z:>5} {eps_text:>9} "
            f"{acc:>9.4f} {acc / base:>7.3f} {seconds:>7.1f}"
        )
    private = [(eps, acc) for setting, acc, eps, _ in rows if setting.noise and eps <= 8]
    best = max((acc for _, acc in private), default=float("nan"))
    verdict = "PASS" if base - best <= 0.10 else "FAIL"
    print(
        f"\npass rule (best setting with epsilon <= 8 within 10 points of non-private): "
        f"best {best:.4f} vs {base:.4f} -> {verdict}"
    )
    if args.plot:
        plot(rows, base, args.plot)
        print(f"plot: {args.plot}")
    print(f"\nReproduce: {shlex.join(['.venv/bin/python', *sys.argv])}")
    return 0


def plot(rows: list[tuple[Setting, float, float, float]], base: float, path: str) -> None:
    """Test accuracy against epsilon, with the non-private baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(eps, acc, s.name) for s, acc, eps, _ in rows if s.noise and np.isfinite(eps)]
    for eps, acc, name in points:
        ax.scatter(eps, acc)
        ax.annotate(name, (eps, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(base, linestyle="--", color="gray", label="non-private FedAvg")
    ax.set_xscale("log")
    ax.set_xlabel("user-level epsilon")
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
