"""Byzantine robustness: test accuracy of FedAvg and the robust rules under 10% and 20%
attackers per round (sign-flipped scaled updates, Gaussian noise).

Rules: FedMedian and FedTrimmedAvg (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018), Krum and MultiKrum
(Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017), Bulyan (El Mhamdi, Guerraoui, Rouault, "The
Hidden Vulnerability of Distributed Learning in Byzantium", ICML 2018).

Honest clients hold IID data, so they are alike, as Krum and Bulyan assume (on very
uneven clients these lose accuracy even without attackers). Two settings (``--data``):

- ``mnist1d`` (default): MNIST-1D (Greydanus 2020; 20,000 samples, 16,000 train / 4,000
  test, fixed data set) over 100 clients (160 samples each), 20 clients per round, the
  MLP of the CLI's ``ModelSpec`` (40-128-10), E = 1 epoch of SGD, B = 10, lr 0.05, 60
  rounds: the model is still far from converged, so rules that learn more slowly (Krum
  keeps one model per round, losing the averaging's noise reduction) trail FedAvg;
- ``digits``: scikit-learn's 8x8 digits (1,437 train / 360 test) over 50 clients (28-29
  samples each), 20 per round, multinomial logistic regression (numpy), E = 2, B = 10,
  lr 0.2, 100 rounds: close to convergence.

Clients use plain SGD (momentum 0).

Attackers: each round, exactly 10% (2) or 20% (4) of the 20 selected clients, chosen by an
RNG seeded by (seed, round), train honestly and then replace their model ``y`` by

- ``signflip``: ``x - 10 (y - x)``: the update sign-flipped and scaled by 10;
- ``gaussian``: ``x + N(0, 200^2)`` in every coordinate (seeded per client and round): the
  update is a Gaussian vector independent of the data, of standard deviation 200, the
  "Gaussian Byzantine workers" of Blanchard et al. 2017 (Section 5), there sent in place
  of a gradient. (Noise of N(0, 1) costs FedAvg under 5 points on digits: too weak to
  tell the rules apart.)

Every robust rule is configured for the worst case, 4 attackers (``num_malicious_clients
= 4``; Bulyan needs ``n >= 4f + 3 = 19``; FedTrimmedAvg trims ``beta = 0.2``, 4 models,
at each end), with and without attack. Final test accuracy after the last round, median
over 3 seeds; a seed changes the partition, the model initialisation, the client
sampling, the attackers and the minibatch order.

Pass rule: under every attack, every robust rule stays within 5 points of its own
attack-free run (the cost of the attack, not of the rule), and FedAvg falls more than 5
points below its own attack-free run. The report also gives each rule's drop below
attack-free FedAvg and the verdict of that stricter reading, which also charges a rule for
what it loses without attack (Krum keeps one model per round). Drops are differences of
the seed medians, in accuracy points.

Run::

    .venv/bin/python benchmarks/robustness.py            # full: MNIST-1D, 3 seeds
    .venv/bin/python benchmarks/robustness.py --data digits
    .venv/bin/python benchmarks/robustness.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from _repro import PerClient, Report, log, median, results_path, simulate, table, with_config
from fedhive.cli.experiment import ClientFactory, ModelSpec, evaluate_params, split_clients
from fedhive.common.message import Message, MessageType
from fedhive.common.records import (
    FitIns,
    FitRes,
    NDArrays,
    Scalar,
    ndarrays_to_parameters,
)
from fedhive.data import Dataset, iid, load_digits, load_mnist1d
from fedhive.server.client_manager import ClientProxy
from fedhive.server.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

BATCH = 10
F = 4  # attackers tolerated by every robust rule (20% of 20)
SCALE = 10.0  # sign flip: the update times -SCALE
SIGMA = 200.0  # Gaussian: standard deviation of the update (Blanchard et al. 2017)
MARGIN = 0.05


@dataclass(frozen=True)
class Setup:
    data: str
    num_samples: int  # MNIST-1D only
    model: str
    num_clients: int
    per_round: int
    epochs: int
    lr: float
    rounds: int
    seeds: int


SETUPS = {
    "mnist1d": Setup("mnist1d", 20000, "mlp", 100, 20, 1, 0.05, 60, 3),
    "digits": Setup("digits", 0, "logreg", 50, 20, 2, 0.2, 100, 3),
}
QUICK = Setup("mnist1d", 2000, "mlp", 40, 20, 1, 0.05, 3, 1)

RULES: dict[str, Callable[[dict[str, Any]], Strategy]] = {
    "FedAvg": lambda a: FedAvg(**a),
    "FedMedian": lambda a: FedMedian(**a),
    "FedTrimmedAvg b=0.2": lambda a: FedTrimmedAvg(beta=0.2, **a),
    f"Krum f={F}": lambda a: Krum(num_malicious_clients=F, **a),
    # unweighted (the paper's): a Byzantine client could claim any num_examples
    f"MultiKrum f={F}": lambda a: MultiKrum(num_malicious_clients=F, weighted=False, **a),
    f"Bulyan f={F}": lambda a: Bulyan(num_malicious_clients=F, **a),
}
#: (name, fraction of each round's clients that attack, attack)
ATTACKS = (
    ("none", 0.0, ""),
    ("10% signflip", 0.1, "signflip"),
    ("20% signflip", 0.2, "signflip"),
    ("10% gaussian", 0.1, "gaussian"),
    ("20% gaussian", 0.2, "gaussian"),
)


def mark_attackers(fraction: float, attack: str):
    """The per-round edit: ``round(fraction * n)`` clients get config ``"attack"``."""

    def edit(
        rng: np.random.Generator, instructions: list[tuple[ClientProxy, FitIns]]
    ) -> list[tuple[ClientProxy, FitIns]]:
        k = round(fraction * len(instructions))
        chosen = set(rng.choice(len(instructions), size=k, replace=False).tolist())
        seeds = rng.integers(2**31, size=len(instructions)).tolist()
        return [
            (p, with_config(ins, attack=attack, attack_seed=int(s)) if i in chosen else ins)
            for i, ((p, ins), s) in enumerate(zip(instructions, seeds, strict=True))
        ]

    return edit


def attack_mod(message: Message, context: Any, call_next: Any) -> Message:
    """Train honestly, then replace the model when the fit config says ``"attack"``."""
    reply: Message = call_next(message, context)
    ins = message.content
    if message.metadata.message_type != MessageType.FIT or reply.error is not None:
        return reply
    attack = ins.config.get("attack") if isinstance(ins, FitIns) else None
    res = reply.content
    if not attack or not isinstance(res, FitRes):
        return reply
    sent, trained = ins.parameters.arrays, res.parameters.arrays
    if attack == "signflip":
        bad = [x - SCALE * (y - x) for x, y in zip(sent, trained, strict=True)]
    else:
        rng = np.random.default_rng(int(ins.config["attack_seed"]))
        bad = [x + rng.normal(0.0, SIGMA, size=x.shape) for x in sent]
    arrays = [b.astype(x.dtype) for b, x in zip(bad, sent, strict=True)]
    res.parameters = ndarrays_to_parameters(arrays)
    return reply


def run_once(
    data: Dataset, setup: Setup, rule: str, fraction: float, attack: str, seed: int
) -> float:
    """Test accuracy after the last round."""
    k = setup.num_clients
    part = iid(data.num_train, k, seed)
    spec = ModelSpec(setup.model, data.input_shape[0], data.num_classes, 128)
    factory = ClientFactory(spec, data.x_train, data.y_train, split_clients(part, 0.0, seed))
    fit_config: dict[str, Scalar] = {
        "local_epochs": setup.epochs,
        "batch_size": BATCH,
        "lr": setup.lr,
        "momentum": 0.0,
    }

    def evaluate_fn(
        rnd: int, params: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        if rnd != setup.rounds:
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
    strategy = PerClient(RULES[rule](args), mark_attackers(fraction, attack), seed)
    track = simulate(strategy, factory, k, setup.rounds, seed, mods=[attack_mod])
    return track.last("accuracy")


def baseline(med: dict[tuple[str, str], float], rule: str, versus: str) -> float:
    """The attack-free accuracy a rule is held to: its own (``"own"``) or FedAvg's."""
    return med[rule if versus == "own" else "FedAvg", "none"]


def drop(med: dict[tuple[str, str], float], rule: str, attack: str, versus: str) -> float:
    """Accuracy points lost under ``attack`` below the ``versus`` baseline."""
    return 100 * (baseline(med, rule, versus) - med[rule, attack])


def report_drops(
    report: Report, med: dict[tuple[str, str], float], names: list[str], versus: str, what: str
) -> None:
    """A table of every rule's drop below ``what``; 'ok' marks a drop within the margin."""
    report(f"\nDrop in points below {what}; 'ok' = within {MARGIN * 100:.0f}:")
    rows = []
    for rule in RULES:
        cells = [rule]
        for a in names:
            d = drop(med, rule, a, versus)
            mark = "" if a == "none" else (" ok" if d <= MARGIN * 100 else " X")
            cells.append(f"{d:+.1f}{mark}")
        rows.append(cells)
    report(table(["rule", *names], rows))


def report_verdict(
    report: Report, med: dict[tuple[str, str], float], names: list[str], versus: str, label: str
) -> bool:
    """Print whether the robust rules hold and FedAvg falls under every attack."""
    attacked, limit = names[1:], MARGIN * 100
    robust = [r for r in RULES if r != "FedAvg"]
    failing = [(r, a) for r in robust for a in attacked if drop(med, r, a, versus) > limit]
    fedavg_holds = [a for a in attacked if drop(med, "FedAvg", a, "own") <= limit]
    ok = not failing and not fedavg_holds
    report(
        f"{label}: robust rules within {limit:.0f} points under every attack: "
        + ("yes" if not failing else "no: " + ", ".join(f"{r} ({a})" for r, a in failing))
    )
    report(
        f"{label}: FedAvg falls more than {limit:.0f} points under every attack: "
        + ("yes" if not fedavg_holds else "no: " + ", ".join(fedavg_holds))
    )
    report(f"{'PASS' if ok else 'FAIL'}: {label}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 seed")
    parser.add_argument("--data", choices=sorted(SETUPS), default="mnist1d")
    parser.add_argument("--rounds", type=int, default=None, help="default 60/100 (quick: 3)")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--out", default=None, help="report file [results/<name>.txt]")
    parser.add_argument("--check", action="store_true", help="exit 1 if the pass rule fails")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    base = QUICK if args.quick else SETUPS[args.data]
    setup = replace(base, rounds=args.rounds or base.rounds, seeds=args.seeds or base.seeds)
    name = "robustness" if setup.data == "mnist1d" else f"robustness_{setup.data}"
    report = Report(__file__, results_path(name, args.quick, args.out))
    data = (
        load_mnist1d(num_samples=setup.num_samples, seed=0)
        if setup.data == "mnist1d"
        else load_digits(seed=0)
    )

    start = time.perf_counter()
    acc: dict[tuple[str, str], list[float]] = {}
    for seed in range(setup.seeds):
        for attack_name, fraction, attack in ATTACKS:
            for rule in RULES:
                t = time.perf_counter()
                value = run_once(data, setup, rule, fraction, attack, seed)
                acc.setdefault((rule, attack_name), []).append(value)
                log(
                    f"{attack_name:12} {rule:19} seed {seed}: acc {value:.4f} "
                    f"({time.perf_counter() - t:.0f} s)"
                )
    total = time.perf_counter() - start

    med = {key: median(values) for key, values in acc.items()}
    title = {"mnist1d": "MNIST-1D", "digits": "digits"}[setup.data]
    model = {"mlp": "MLP 40-128-10", "logreg": "logistic regression"}[setup.model]
    report(
        f"Byzantine robustness on {title} (IID): test accuracy after {setup.rounds} rounds, "
        f"median of {setup.seeds} seed(s)"
    )
    report(
        f"{data.num_train} train / {data.num_test} test samples, {setup.num_clients} clients, "
        f"{setup.per_round} per round, {model}, E = {setup.epochs}, B = {BATCH}, SGD lr "
        f"{setup.lr:g}; robust rules set for f = {F}; attackers per round: 10% = "
        f"{round(0.1 * setup.per_round)}, 20% = {round(0.2 * setup.per_round)}"
    )
    report(
        f"signflip: x - {SCALE:g} (y - x); gaussian: x + N(0, {SIGMA:g}^2) per coordinate "
        f"(Blanchard et al. 2017, Sec. 5: Gaussian Byzantine vectors, std {SIGMA:g})"
    )
    report(
        f"Pass rule: under every attack each robust rule stays within {MARGIN * 100:.0f} "
        "points of its own attack-free run, and FedAvg does not.\n"
    )
    names = [a for a, _, _ in ATTACKS]
    report(table(["rule", *names], [[r, *(f"{med[r, a]:.4f}" for a in names)] for r in RULES]))
    report_drops(report, med, names, "own", "its own attack-free run ('none' column)")
    report_drops(report, med, names, "fedavg", f"attack-free FedAvg ({med['FedAvg', 'none']:.4f})")
    report("\nPer seed:")
    seed_rows = [
        [rule, *(" ".join(f"{v:.3f}" for v in acc[rule, a]) for a in names)] for rule in RULES
    ]
    report(table(["rule", *names], seed_rows))

    report()
    ok = report_verdict(report, med, names, "own", "pass rule (each rule vs its own run)")
    report_verdict(report, med, names, "fedavg", "stricter reading (vs attack-free FedAvg)")
    report(f"Total wall time: {total:.0f} s")
    report.finish(argv)
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
