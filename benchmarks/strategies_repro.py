"""Strategy library, quick reproductions: every strategy against FedAvg in the same run.

Two scenarios on FedProx's Synthetic data (Li et al. 2020; ``fedhive.data.synthetic``),
multinomial logistic regression in numpy (the CLI's ``SimClient``), centralized test
loss and accuracy after the last round:

- ``non-iid``: Synthetic(1, 1), 30 devices of very different sizes (so different local
  step counts, which FedNova normalises), 10 sampled per round, 1 local epoch of SGD.
  FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, q-FedAvg, FedNova and SCAFFOLD against
  FedAvg. The quick mode's rounds are far too few to rank the methods as the papers do:
  it checks that each one trains and shows where it stands after a short run.
- ``byzantine``: Synthetic(0.5, 0.5), 11 devices all sampled every round, 2 of them send
  their update sign-flipped and scaled by 10. FedMedian, FedTrimmedAvg, Krum, MultiKrum and
  Bulyan (``f = 2``) against FedAvg with and without the attack. The devices differ a lot,
  and Krum's selection favours the models that moved least (the small devices): Krum and
  Bulyan stay far below FedAvg here even without attackers (seen in a separate run).

The ratio column is the accuracy divided by the scenario's baseline accuracy (FedAvg; for
``byzantine``, FedAvg without attackers), measured in the same run.

Only the quick mode exists (the full reproductions are future work)::

    .venv/bin/python benchmarks/strategies_repro.py --quick
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhive.cli.experiment import ClientFactory, ModelSpec
from fedhive.client.mods import scaffold_mod
from fedhive.common.message import Message, MessageType
from fedhive.common.records import ndarrays_to_parameters
from fedhive.data import load_dataset
from fedhive.data.partition import natural
from fedhive.models import numpy_lr
from fedhive.server.config import ServerConfig
from fedhive.server.engine import RoundCallback
from fedhive.server.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedNova,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Scaffold,
    Strategy,
)
from fedhive.simulation import start_simulation

SEED = 0
ATTACKERS = 2


@dataclass
class Setup:
    factory: ClientFactory
    spec: ModelSpec
    x_test: np.ndarray
    y_test: np.ndarray
    num_clients: int
    per_round: int
    fit_config: dict[str, Any]


def setup(alpha: float, beta: float, num_devices: int, per_round: int) -> Setup:
    data = load_dataset(
        "synthetic", alpha=alpha, beta=beta, num_devices=num_devices, seed=SEED
    )  # fmt: skip
    if data.client_ids_train is None:
        raise RuntimeError("the synthetic data set has no device ids")
    part = natural(data.client_ids_train)
    splits = [(np.sort(idx), np.array([], dtype=np.int64)) for idx in part.indices]
    spec = ModelSpec("logreg", int(data.x_train.shape[1]), data.num_classes, 1)
    factory = ClientFactory(spec, data.x_train, data.y_train, splits)
    config = {"local_epochs": 1, "batch_size": 20, "lr": 0.02, "momentum": 0.0}
    return Setup(factory, spec, data.x_test, data.y_test, len(splits), per_round, config)


def fedavg_args(s: Setup) -> dict[str, Any]:
    return {
        "fraction_fit": s.per_round / s.num_clients,
        "min_fit_clients": s.per_round,
        "min_available_clients": s.num_clients,
        "fraction_evaluate": 0.0,
        "on_fit_config_fn": lambda rnd: dict(s.fit_config),
        "initial_parameters": ndarrays_to_parameters(s.spec.initial(SEED)),
    }


def sign_flip_mod(message: Message, context: Any, call_next: Any) -> Message:
    """Clients with partition id < ATTACKERS send ``x - 10 (y - x)`` instead of ``y``."""
    reply: Message = call_next(message, context)
    attacker = int(context.node_config["partition-id"]) < ATTACKERS
    if message.metadata.message_type != MessageType.FIT or reply.error or not attacker:
        return reply
    sent, trained = message.content.parameters.arrays, reply.content.parameters.arrays
    flipped = [(x - 10.0 * (y - x)).astype(x.dtype) for x, y in zip(sent, trained, strict=True)]
    reply.content.parameters = ndarrays_to_parameters(flipped)
    return reply


class Last(RoundCallback):
    def __init__(self) -> None:
        self.model: list[np.ndarray] = []

    def on_run_end(self, engine: Any, history: Any) -> None:
        self.model = list(engine.parameters.arrays)


def run(s: Setup, strategy: Strategy, rounds: int, mods: Sequence[Any]) -> tuple[float, float]:
    last = Last()
    start_simulation(
        client_fn=s.factory,
        num_clients=s.num_clients,
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
        seed=SEED,
        mods=mods,
        callbacks=[last],
    )
    return numpy_lr.evaluate(last.model, s.x_test, s.y_test)


Make = Callable[[dict[str, Any]], Strategy]

NON_IID: list[tuple[str, Make, bool]] = [
    ("FedAvg", lambda a: FedAvg(**a), False),
    ("FedProx mu=0.01", lambda a: FedProx(proximal_mu=0.01, **a), False),
    ("FedAvgM m=0.5", lambda a: FedAvgM(server_momentum=0.5, **a), False),
    ("FedAdam", lambda a: FedAdam(eta=0.03, tau=1e-3, **a), False),
    ("FedYogi", lambda a: FedYogi(eta=0.03, tau=1e-3, **a), False),
    ("FedAdagrad", lambda a: FedAdagrad(eta=0.03, tau=1e-3, **a), False),
    ("QFedAvg q=0.2", lambda a: QFedAvg(q_param=0.2, qffl_learning_rate=0.02, **a), False),
    ("FedNova", lambda a: FedNova(**a), False),
    ("Scaffold", lambda a: Scaffold(**a), True),
]

BYZANTINE: list[tuple[str, Make, bool]] = [
    ("FedAvg (no attack)", lambda a: FedAvg(**a), False),
    ("FedAvg", lambda a: FedAvg(**a), True),
    ("FedMedian", lambda a: FedMedian(**a), True),
    ("FedTrimmedAvg b=0.2", lambda a: FedTrimmedAvg(beta=0.2, **a), True),
    ("Krum f=2", lambda a: Krum(num_malicious_clients=ATTACKERS, **a), True),
    ("MultiKrum f=2", lambda a: MultiKrum(num_malicious_clients=ATTACKERS, **a), True),
    ("Bulyan f=2", lambda a: Bulyan(num_malicious_clients=ATTACKERS, **a), True),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the only mode implemented")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    if not args.quick:
        parser.error("only --quick is implemented; the full reproductions are not written yet")
    rows = []
    scenarios = [
        ("non-iid", setup(1.0, 1.0, 30, 10), NON_IID),
        ("byzantine", setup(0.5, 0.5, 2 * 4 + 3, 11), BYZANTINE),
    ]
    for scenario, s, entries in scenarios:
        baseline = None
        for name, make, flag in entries:
            mods = [scaffold_mod] if name == "Scaffold" and flag else []
            if scenario == "byzantine" and flag:
                mods = [sign_flip_mod]
            start = time.perf_counter()
            loss, acc = run(s, make(fedavg_args(s)), args.rounds, mods)
            baseline = acc if baseline is None else baseline
            rows.append((scenario, name, loss, acc, acc / baseline, time.perf_counter() - start))
    print(f"{args.rounds} rounds, seed {SEED}, logistic regression on Synthetic (Li et al. 2020)")
    print()
    header = (
        f"{'scenario':<10} {'strategy':<20} {'test loss':>10} {'test acc':>9} {'ratio':>6} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    for scenario, name, loss, acc, ratio, secs in rows:
        print(f"{scenario:<10} {name:<20} {loss:>10.3f} {acc:>9.3f} {ratio:>6.2f} {secs:>6.1f}")
    print()
    print(
        "Reproduce: .venv/bin/python benchmarks/strategies_repro.py "
        + shlex.join(argv or sys.argv[1:])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
