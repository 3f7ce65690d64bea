"""Stragglers on simulated devices: virtual time to a target accuracy, sync vs async.

MNIST-1D (``mnist1d``, 8000 samples), Dirichlet(0.3) over 100 clients, the CLI's MLP
(hidden 64), one local epoch, batch 16, lr 0.05, momentum 0.9. Devices: ``[system]``
lognormal compute speed with sigma 1.5 and 0.5 (median 1000 examples/s), 10 Mbit/s links.
Every method folds the same number of client results (``rounds x 10``) and is evaluated
centrally after every model version:

- ``fedavg``: synchronous FedAvg, 10 clients a round (every round waits for its slowest);
- ``fedavg+deadline``: FedAvg asking for 130% (13 clients) and keeping the first 10 to
  arrive, with a round deadline at the 80th percentile of the clients' task durations;
- ``fedasync``: FedAsync (Xie et al. 2019), alpha 0.6, polynomial staleness, 20 clients
  training at once, a version per result;
- ``fedbuff``: FedBuff (Nguyen et al. 2022), buffer 10, 20 clients training at once,
  polynomial staleness (a = 0.5), server lr 1.

Reported per sigma (median over 3 seeds): simulated seconds until the centralized test
accuracy first reaches the target, the final accuracy (mean of the last 5 versions), and
FedBuff's time as a fraction of the two synchronous ones. Targets (the issue): FedBuff
reaches the target in at most 50% of the time of over-selected FedAvg and at most 10% of
plain FedAvg, with at most 1 point lower final accuracy.

Also: wall time of the simulator per client task, FedBuff on the virtual clock next to
the same number of plain synchronous FedAvg tasks on the real clock (target: within 10%).

Run::

    nice -n 10 .venv/bin/python benchmarks/stragglers.py            # 3 seeds, 100 rounds
    nice -n 10 .venv/bin/python benchmarks/stragglers.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedhive.cli.config import validate
from fedhive.cli.experiment import build_experiment, run_experiment
from fedhive.common.message import Message, MessageType
from fedhive.common.records import FitIns
from fedhive.transport.base import content_length

RESULTS = Path(__file__).resolve().parent / "results" / "stragglers.txt"
PER_ROUND = 10


def _config(
    method: str,
    sigma: float,
    seed: int,
    rounds: int,
    system: bool = True,
    params: dict[str, Any] | None = None,
) -> Any:
    strategy: dict[str, Any] = {"fraction_evaluate": 0.0, "fraction_fit": PER_ROUND / 100}
    versions = rounds
    if method == "fedbuff":
        strategy |= {"name": "fedbuff", "buffer_size": PER_ROUND, "concurrency": 2 * PER_ROUND}
        strategy |= {"staleness": "poly", "staleness_exponent": 0.5, "server_lr": 1.0}
    elif method == "fedasync":
        strategy |= {"name": "fedasync", "concurrency": 2 * PER_ROUND, "alpha": 0.6}
    strategy |= params or {}
    if method == "fedbuff":  # the same number of results for every method
        versions = rounds * PER_ROUND // strategy["buffer_size"]
    elif method == "fedasync":
        versions = rounds * PER_ROUND  # a version per result
    data = {
        "seed": seed,
        "rounds": versions,
        "num_clients": 100,
        "out": "runs/stragglers",
        "data": {
            "dataset": "mnist1d",
            "num_samples": 8000,
            "partition": "dirichlet",
            "alpha": 0.3,
            "min_size": 10,
            "val_fraction": 0.0,
        },
        "model": {"name": "mlp", "hidden": 64},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "strategy": strategy,
        "simulation": {"num_workers": 1},
    }
    if system:
        data["system"] = {"latency": "lognormal", "sigma": sigma, "bandwidth_mbps": 10.0}
    return validate(data)


def _deadline(exp: Any, seed: int, percentile: float) -> float:
    """A percentile of the clients' fit durations under their simulated devices."""
    sizes = {str(i): len(train) for i, (train, _) in enumerate(exp.client_fn.splits)}
    model = exp.cfg.system.build(sizes, seed)
    params = exp.strategy.initial_parameters  # read, not taken: the run still needs it
    durations = []
    for cid in sizes:
        task = Message.task(
            run_id=0,
            node_id=cid,
            server_round=1,
            model_version=0,
            message_type=MessageType.FIT,
            content=FitIns(params, {"local_epochs": 1}),
            seed=0,
        )
        # the upload counted as long as the download (the update is the model's size)
        upload = model.upload_seconds(task, content_length(task))
        durations.append(model.plan(task).duration_s + upload)
    return float(np.percentile(durations, percentile))


def run(
    method: str,
    sigma: float,
    seed: int,
    rounds: int,
    system: bool = True,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    params = dict(params or {})
    percentile = params.pop("deadline_percentile", 80.0)
    base = method if method != "fedavg+deadline" else "fedavg"
    cfg = _config(base, sigma, seed, rounds, system, params)
    exp = build_experiment(cfg)
    if method == "fedavg+deadline":
        deadline = _deadline(exp, seed, percentile)
        strategy = {**cfg.strategy.model_dump(exclude_unset=True), "name": "fedavg"}
        strategy |= {"over_selection": 0.3, "deadline_s": deadline}
        cfg = validate({**cfg.model_dump(), "strategy": strategy})
        exp = build_experiment(cfg)
    started = time.perf_counter()
    history = run_experiment(exp)
    wall = time.perf_counter() - started
    curve = [
        (r.get("virtual_time_s", 0.0), r["centralized"]["accuracy"])
        for r in history.rounds
        if r["round"] > 0
    ]
    tasks = sum(
        r["fit"].get("num_results", 0) + len(r.get("failures", [])) + r["fit"].get("discarded", 0)
        for r in history.rounds
        if r["round"] > 0
    )
    return {"curve": curve, "wall": wall, "tasks": tasks}


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    for at, acc in curve:
        if acc >= target:
            return at
    return float("inf")


def final(curve: list[tuple[float, float]]) -> float:
    return float(np.mean([acc for _, acc in curve[-5:]]))


METHODS = ("fedavg", "fedavg+deadline", "fedasync", "fedbuff")

#: Seeds of the tuning runs: their data, partition, devices and initial model differ from
#: those of the reported seeds (0, 1, 2), which no setting is chosen on.
TUNING_SEEDS = (100, 101)
#: The settings tried per method (``--tune``); FedBuff's buffer stays at 10 results.
GRID: dict[str, list[dict[str, Any]]] = {
    "fedavg": [{}],
    "fedavg+deadline": [{"deadline_percentile": p} for p in (50.0, 80.0, 95.0)],
    "fedbuff": [{"concurrency": c, "server_lr": lr} for c in (10, 20, 40) for lr in (1.0, 2.0)],
    "fedasync": [{"concurrency": c, "alpha": a} for c in (5, 20) for a in (0.6, 0.9)],
}


def choose(
    method: str, rows: list[tuple[dict[str, Any], float, float]], fedavg_final: float
) -> dict[str, Any]:
    """The setting kept for ``method`` from its tuning ``rows`` of (setting, median time
    to target, median final accuracy), by rules fixed before the runs: the fastest to
    the target; for FedBuff the fastest of those within 1 point of FedAvg's final
    accuracy, or, if none is, the most accurate."""
    if method == "fedbuff":
        within = [r for r in rows if r[2] >= fedavg_final - 0.01]
        if not within:
            return max(rows, key=lambda r: r[2])[0]
        rows = within
    return min(rows, key=lambda r: (r[1], -r[2]))[0]


def tune(args: argparse.Namespace, say: Any) -> None:
    """Every setting of :data:`GRID` on the tuning seeds, and the one each rule keeps."""
    methods = [args.only] if args.only else list(METHODS)
    for sigma in [args.sigma] if args.sigma else [1.5, 0.5]:
        say()
        say(f"tuning, lognormal sigma = {sigma}, seeds {TUNING_SEEDS}, target {args.target}")
        say(f"{'method':<18}{'setting':<40}{'s to target per seed':>26}{'median':>9}{'final':>8}")
        fedavg_final = None
        needs_fedavg = "fedbuff" in methods or "fedavg" in methods  # FedBuff's rule reads it
        for method in ["fedavg"] * needs_fedavg + [m for m in methods if m != "fedavg"]:
            rows = []
            for params in GRID[method]:
                runs = [
                    run(method, sigma, seed, args.rounds, params=params) for seed in TUNING_SEEDS
                ]
                per_seed = [time_to(r["curve"], args.target) for r in runs]
                t = statistics.median(per_seed)
                acc = statistics.median(final(r["curve"]) for r in runs)
                rows.append((params, t, acc))
                setting = ", ".join(f"{k} = {v}" for k, v in params.items()) or "-"
                seeds = ", ".join(f"{x:.2f}" for x in per_seed)
                say(f"{method:<18}{setting:<40}{seeds:>26}{t:>9.2f}{acc:>8.4f}")
            if method == "fedavg":
                fedavg_final = rows[0][2]
                continue
            say(f"  kept for {method}: {choose(method, rows, fedavg_final or 0.0)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.40)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 seed")
    parser.add_argument("--wall-only", action="store_true", help="only the wall time per task")
    parser.add_argument("--tune", action="store_true", help="the settings sweep (GRID)")
    parser.add_argument("--only", choices=METHODS, help="--tune: this method (and fedavg)")
    parser.add_argument("--sigma", type=float, help="--tune: this sigma only")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seeds = 3, 1
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if args.tune:
        say("command: nice -n 10 .venv/bin/python benchmarks/stragglers.py " + " ".join(argv))
        tune(args, say)
        return 0

    say(f"fedhive stragglers benchmark: {args.rounds} rounds x {PER_ROUND} results, "
        f"{args.seeds} seeds, target accuracy {args.target}")  # fmt: skip
    say("command: nice -n 10 .venv/bin/python benchmarks/stragglers.py " + " ".join(argv))
    say("machine: 2 cores shared with other jobs (loaded); one worker; times are simulated")
    for sigma in () if args.wall_only else (1.5, 0.5):
        results = {m: [run(m, sigma, s, args.rounds) for s in range(args.seeds)] for m in METHODS}
        say()
        say(f"lognormal sigma = {sigma}: median over seeds")
        say(f"{'method':<18}{'virtual s to target':>22}{'final accuracy':>16}{'per seed (s)':>40}")
        times = {}
        for m in METHODS:
            per_seed = [time_to(r["curve"], args.target) for r in results[m]]
            times[m] = statistics.median(per_seed)
            acc = statistics.median(final(r["curve"]) for r in results[m])
            seeds = ", ".join(f"{t:.1f}" for t in per_seed)
            say(f"{m:<18}{times[m]:>22.2f}{acc:>16.4f}{seeds:>40}")
        finals = {m: statistics.median(final(r["curve"]) for r in results[m]) for m in METHODS}
        for base in ("fedavg+deadline", "fedavg"):
            ratio = times["fedbuff"] / times[base] if times[base] else float("nan")
            say(f"fedbuff / {base}: time {ratio:.3f}, final accuracy "
                f"{100 * (finals['fedbuff'] - finals[base]):+.2f} points")  # fmt: skip
    say()
    say("simulator wall time per client task (seed 0, sigma 1.5)")
    plain = run("fedavg", 1.5, 0, args.rounds, system=False)
    simulated = run("fedbuff", 1.5, 0, args.rounds)
    sync_sim = run("fedavg", 1.5, 0, args.rounds)
    for label, r in (
        ("fedavg, real clock, no [system]", plain),
        ("fedavg, virtual clock, [system]", sync_sim),
        ("fedbuff, virtual clock, [system]", simulated),
    ):
        say(f"{label:<36}{r['tasks']:>6} tasks {1e3 * r['wall'] / r['tasks']:>8.2f} ms/task")
    ratio = (simulated["wall"] / simulated["tasks"]) / (plain["wall"] / plain["tasks"])
    say(f"fedbuff on the virtual clock / plain synchronous: {ratio:.3f} per task")
    if not (args.quick or args.wall_only):
        RESULTS.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
