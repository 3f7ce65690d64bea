"""Personalized FL on non-IID MNIST-1D: per-client test accuracy of eight methods.

Methods (``fedhive.personalization``): global FedAvg (McMahan et al. 2017; its global
model on each client's test split), local-only training (each client alone, no
federation), FedAvg + local fine-tuning (Cheng, Chadha, Duchi 2021), FedPer (Arivazhagan
et al. 2019; personal head), FedRep (Collins et al. 2021; head first, body frozen), FedBN
(Li et al. 2021; batch norm local), Ditto (Li, Hu, Beirami, Smith 2021; lambda) and APFL
(Deng, Kamani, Mahdavi 2020; learned alpha).

Setting: MNIST-1D (Greydanus 2020; 20,000 samples, the 16,000 train ones are
partitioned) over 100 clients, each client's data cut into 70% train / 10% validation /
20% test; pathological non-IID (2 label-sorted shards per client, McMahan et al. 2017)
and Dirichlet(0.1) (at least 5 samples per client: at alpha = 0.1 no draw of 1,000 gives
every client 10). Model: the 1-D CNN of ``fedhive.models`` with 16 channels and batch
norm after each convolution (the same model for every method, so that FedBN has its
layers), about 4k parameters. 20 clients per round for 30 rounds, E = 2 local epochs, B = 10, SGD lr
0.05, momentum 0.5. Every client (also those never sampled) is evaluated every
``--eval-every`` rounds and after the last one. Local-only clients train alone for
``--local-epochs`` epochs, evaluated every 2 epochs.

Parameters, fixed before any run (none tuned on test data): fine-tuning 1 epoch; FedPer
and FedRep keep the linear head personal, FedRep trains it 2 epochs first; Ditto lambda
0.1 with 2 personal epochs; APFL alpha starts at 0.25, learned with lr 0.001 (the
library default; at 0.1 alpha reached 0 within a round). Other parameters of the same
methods (``VARIANTS``) run only when named in ``--methods``; the best method is the
one with the best mean *validation* accuracy. Fine-tuning for 10 or 20 epochs
(``FedAvg + fine-tuning (10 epochs)``, ``(20 epochs)``) gives the federated model the
local training budget that local-only gets (up to 20 epochs, its count chosen on
validation); which fine-tuning count wins is decided on validation accuracy too.
``FedAvg + LP-FT (5 head + 15 epochs)`` fine-tunes the head alone first (Kumar et al.
2022), 20 epochs in all. A fine-tuning longer than local-only's largest epoch count is
refused: both get the same local budget (``--local-epochs``).

Figures: mean, worst-10% (mean of the worst 10 clients) and std of the per-client test
accuracy, at the last round and at the round (for local-only: the epoch count) chosen on
mean validation accuracy, never the best round on test data; median and spread over 3
seeds (a seed changes the partition, the initial model, the sampling and the minibatch
order). Targets (the issue): the best personalized method is at least 10 points above
global FedAvg in mean per-client accuracy, at least 3 points above local-only in mean and
5 in worst-10%, and not below FedAvg + fine-tuning.

Run::

    nice .venv/bin/python benchmarks/personalization.py             # full, both partitions
    nice .venv/bin/python benchmarks/personalization.py --quick     # smoke run, seconds
    # one job per seed on a shared machine, then one report of all of them:
    nice .venv/bin/python benchmarks/personalization.py --partition dirichlet \
        --seed-list 0 --save-json d0.json --out d0.txt     # (and 1, 2)
    .venv/bin/python benchmarks/personalization.py --combine d0.json d1.json d2.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from _repro import Report, log, results_path, table
from fedhive.common.records import ndarrays_to_parameters
from fedhive.data import load_dataset
from fedhive.data.partition import ClientSplit, client_splits, dirichlet, shards
from fedhive.models.torch_models import CNN1D, evaluate_torch, get_weights, train_torch
from fedhive.personalization import (
    PersonalizationConfig,
    PersonalizationReport,
    PersonalizedTorchClient,
    report,
    summarize,
)
from fedhive.server.config import ServerConfig
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation

FIT = {"local_epochs": 2, "batch_size": 10, "lr": 0.05, "momentum": 0.5}

#: (label, method, parameters); method None is local-only training. The default run.
METHODS: tuple[tuple[str, str | None, dict[str, Any]], ...] = (
    ("FedAvg (global)", "none", {}),
    ("local only", None, {}),
    ("FedAvg + fine-tuning", "finetune", {"finetune_epochs": 1}),
    ("FedPer", "fedper", {"personal_layers": ("head",)}),
    ("FedRep", "fedrep", {"personal_layers": ("head",), "head_epochs": 2}),
    ("FedBN", "fedbn", {}),
    ("Ditto", "ditto", {"lam": 0.1, "personal_epochs": 2}),
    ("APFL", "apfl", {"alpha": 0.25, "alpha_lr": 0.001}),
)
#: Other parameters of the same methods, run only when named in ``--methods`` (the
#: tuning runs in the results file; a variant is chosen on validation accuracy).
VARIANTS: tuple[tuple[str, str | None, dict[str, Any]], ...] = (
    ("FedAvg + fine-tuning (3 epochs)", "finetune", {"finetune_epochs": 3}),
    ("FedAvg + fine-tuning (10 epochs)", "finetune", {"finetune_epochs": 10}),
    ("FedAvg + fine-tuning (20 epochs)", "finetune", {"finetune_epochs": 20}),
    (
        "FedAvg + LP-FT (5 head + 15 epochs)",
        "finetune",
        {"finetune_epochs": 15, "finetune_head": ("head",), "finetune_head_epochs": 5},
    ),
    ("FedRep (head 5)", "fedrep", {"personal_layers": ("head",), "head_epochs": 5}),
    (
        "FedPer (head + last conv)",
        "fedper",
        {"personal_layers": ("head", "features.6", "features.7")},
    ),
    ("Ditto (lam 0.01)", "ditto", {"lam": 0.01, "personal_epochs": 2}),
    ("Ditto (lam 1)", "ditto", {"lam": 1.0, "personal_epochs": 2}),
    ("APFL (alpha_lr 0.1)", "apfl", {"alpha": 0.25, "alpha_lr": 0.1}),
)
#: Rows that are baselines, not personalized methods.
BASELINES = ("FedAvg (global)", "local only")


@dataclass(frozen=True)
class Setup:
    num_clients: int
    rounds: int
    per_round: int
    eval_every: int
    local_epochs: int
    channels: int = 16


class EvaluateEvery(FedAvg):
    """FedAvg that evaluates (every client) only every ``every`` rounds and at the end."""

    def __init__(self, every: int, last: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every, self.last = every, last

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        if server_round % self.every and server_round != self.last:
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)


def _model(setup: Setup, seed: int) -> torch.nn.Module:
    return CNN1D(10, length=40, channels=setup.channels, seed=seed, batch_norm=True)


def _splits(partition: str, y: np.ndarray, setup: Setup, seed: int) -> list[ClientSplit]:
    if partition == "shards":
        part = shards(y, setup.num_clients, 2, seed=seed)
    else:
        part = dirichlet(y, setup.num_clients, 0.1, seed, min_size=5)
    return client_splits(part, val_fraction=0.1, test_fraction=0.2, seed=seed)


def run_federated(
    method: str,
    params: dict[str, Any],
    data: Any,
    splits: list[ClientSplit],
    setup: Setup,
    seed: int,
) -> dict[str, Any]:
    x, y = data
    config = PersonalizationConfig(method=method, **params)  # type: ignore[arg-type]
    initial = get_weights(_model(setup, seed))
    local = {}

    def model_fn() -> torch.nn.Module:
        import threading

        key = threading.get_ident()
        if key not in local:
            local[key] = _model(setup, seed)
        return local[key]

    def client_fn(context):  # type: ignore[no-untyped-def]
        part = splits[int(context.node_id)]
        return PersonalizedTorchClient(
            model_fn, config, train=(x[part.train], y[part.train]),
            test=(x[part.test], y[part.test]), val=(x[part.val], y[part.val]),
            initial=initial,
        )  # fmt: skip

    split = PersonalizedTorchClient(
        model_fn, config, train=(x[:1], y[:1]), test=(x[:1], y[:1]), initial=initial
    ).split
    strategy = EvaluateEvery(
        setup.eval_every,
        setup.rounds,
        fraction_fit=setup.per_round / setup.num_clients,
        min_fit_clients=setup.per_round,
        min_evaluate_clients=setup.num_clients,
        min_available_clients=setup.num_clients,
        initial_parameters=ndarrays_to_parameters(split.shared(initial)),
        on_fit_config_fn=lambda rnd: dict(FIT),
    )
    history = start_simulation(
        client_fn=client_fn,
        num_clients=setup.num_clients,
        strategy=strategy,
        config=ServerConfig(num_rounds=setup.rounds),
        seed=seed,
        num_workers=1,
        callbacks=[PersonalizationReport()],
    )
    return report(history)


def run_local(data: Any, splits: list[ClientSplit], setup: Setup, seed: int) -> dict[str, Any]:
    """Every client alone: ``local_epochs`` epochs from the same initial model, the
    figures after every 2 epochs, as rounds of a history (selected on validation)."""
    x, y = data
    model = _model(setup, seed)
    initial = get_weights(model)
    checkpoints = list(range(2, setup.local_epochs + 1, 2))
    rows: dict[int, list[dict[str, Any]]] = {e: [] for e in checkpoints}
    for cid, part in enumerate(splits):
        from fedhive.models.torch_models import set_weights

        set_weights(model, initial)
        done = 0
        for epochs in checkpoints:
            train_torch(
                model, x[part.train], y[part.train], epochs=epochs - done,
                batch_size=FIT["batch_size"], lr=FIT["lr"], momentum=FIT["momentum"],
                seed=seed * 1000 + cid * 10 + epochs,
            )  # fmt: skip
            done = epochs
            loss, acc = evaluate_torch(model, x[part.test], y[part.test])
            vacc = evaluate_torch(model, x[part.val], y[part.val])[1] if len(part.val) else math.nan
            rows[epochs].append(
                {"client_id": str(cid), "num_examples": len(part.test), "accuracy": acc,
                 "loss": loss, "val_accuracy": vacc, "val_loss": 0.0,
                 "val_num_examples": len(part.val)}
            )  # fmt: skip
    rounds = []
    for epochs in checkpoints:
        summary = summarize(rows[epochs])
        rounds.append({"round": epochs, "personalized": summary, "global": summary})
    return report({"rounds": rounds})


def _cell(values: Sequence[float]) -> str:
    med = statistics.median(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{100 * med:5.1f} ±{100 * spread:4.1f}"


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--partition", choices=("shards", "dirichlet", "both"), default="both")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-list", default="", help="comma-separated seeds (instead of --seeds)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=20)
    ap.add_argument("--methods", default="", help="comma-separated labels (default: METHODS)")
    ap.add_argument("--save-json", default=None, help="also save every run's figures here")
    ap.add_argument(
        "--combine", nargs="+", default=None, help="report the runs saved in these JSON files"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Report(__file__, results_path("personalization", args.quick, args.out))
    if args.combine:
        return _combine(out, args.combine, argv)
    if args.quick:
        setup = Setup(
            num_clients=10, rounds=2, per_round=3, eval_every=1, local_epochs=2, channels=4
        )
        seeds, num_samples = [0], 2000
    else:
        setup = Setup(100, args.rounds, args.per_round, args.eval_every, args.local_epochs)
        seeds, num_samples = list(range(args.seeds)), 20000
    if args.seed_list:
        seeds = [int(v) for v in args.seed_list.split(",")]
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = {m[0]: m for m in METHODS + VARIANTS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        ap.error(f"unknown --methods {unknown}; known: {list(known)}")
    methods = [known[w] for w in wanted] if wanted else list(METHODS)
    over = [m[0] for m in methods if _finetune_budget(m[2]) > setup.local_epochs]
    if over:
        ap.error(
            f"{over} fine-tune longer than local-only's {setup.local_epochs} epochs; "
            "raise --local-epochs so that both get the same local budget"
        )
    partitions = ("shards", "dirichlet") if args.partition == "both" else (args.partition,)
    dataset = load_dataset("mnist1d", num_samples=num_samples, seed=0)
    data = (dataset.x_train, dataset.y_train)
    out(_header(len(data[1]), setup, seeds))
    started = time.perf_counter()
    saved: dict[str, Any] = {"header": _header(len(data[1]), setup, seeds), "partitions": {}}
    for partition in partitions:
        results: dict[str, list[dict[str, Any]]] = {}
        for label, method, params in methods:
            for seed in seeds:
                log(f"{partition} {label} seed {seed}")
                splits = _splits(partition, data[1], setup, seed)
                t0, c0 = time.perf_counter(), time.process_time()
                if method is None:
                    figures = run_local(data, splits, setup, seed)
                else:
                    figures = run_federated(method, params, data, splits, setup, seed)
                figures["seconds"] = time.perf_counter() - t0
                figures["cpu_seconds"] = time.process_time() - c0
                figures["seed"] = seed
                results.setdefault(label, []).append(figures)
                if args.save_json:  # after every run: a killed job keeps what it did
                    saved["partitions"][partition] = results
                    _save_json(args.save_json, saved)
        _report(out, partition, results)
    out(f"\nTotal {time.perf_counter() - started:.0f} s; {_load()}.")
    out.finish(argv)
    return 0


def _finetune_budget(params: dict[str, Any]) -> int:
    """The local epochs a fine-tuning spends after federation (both LP-FT stages)."""
    return int(params.get("finetune_epochs", 0)) + int(params.get("finetune_head_epochs", 0))


def _header(num_samples: int, setup: Setup, seeds: Sequence[int]) -> str:
    return (
        f"Personalized FL, MNIST-1D ({num_samples} train samples partitioned), "
        f"{setup.num_clients} clients, {setup.per_round} per round, {setup.rounds} rounds, "
        f"E = {FIT['local_epochs']}, local-only up to {setup.local_epochs} epochs, "
        f"seeds {list(seeds)}; per-client test accuracy in %, median ± half-range over seeds."
    )


def _load() -> str:
    import os

    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (2 shared cores)"


def _save_json(path: str, saved: dict[str, Any]) -> None:
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(saved, indent=1))


def _combine(out: Report, paths: Sequence[str], argv: Sequence[str]) -> int:
    """One report of runs saved by ``--save-json`` (e.g. one seed per job)."""
    import json
    from pathlib import Path

    merged: dict[str, dict[str, list[dict[str, Any]]]] = {}
    headers = []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        headers.append(saved["header"])
        for partition, results in saved["partitions"].items():
            for label, runs in results.items():
                merged.setdefault(partition, {}).setdefault(label, []).extend(runs)
    for header in dict.fromkeys(headers):
        out(header)
    order = [m[0] for m in METHODS + VARIANTS]
    for partition, results in merged.items():
        ranked = dict(sorted(results.items(), key=lambda kv: order.index(kv[0])))
        for runs in ranked.values():
            runs.sort(key=lambda r: r.get("seed", 0))
        _report(out, partition, ranked)
    out(f"\nCombined {len(paths)} files; {_load()} when combined.")
    out.finish(argv)
    return 0


def _pick(figures: dict[str, Any], when: str, label: str) -> dict[str, float]:
    model = "global" if label == "FedAvg (global)" else "personalized"
    return figures[when][model]


def _median(runs: list[dict[str, Any]], label: str, key: str) -> float:
    return statistics.median(_pick(r, "selected", label)[key] for r in runs)


def _report(out: Report, partition: str, results: dict[str, list[dict[str, Any]]]) -> None:
    """The table of every method next to the two baselines (differences in points of the
    selected round's medians), and the targets for the method with the best mean
    *validation* accuracy (the method is chosen on validation, like the round)."""
    name = "2 shards per client" if partition == "shards" else "Dirichlet(0.1)"
    out(f"\n== {name} ==")
    rows = []
    base = {b: results[b] for b in BASELINES if b in results}
    for label, runs in results.items():
        cells = [label, str(len(runs))]
        for when in ("last", "selected"):
            figs = [_pick(r, when, label) for r in runs]
            cells += [_cell([f["mean"] for f in figs]), _cell([f["worst10"] for f in figs])]
        cells.append(_cell([_pick(r, "selected", label)["val_mean"] for r in runs]))
        for key in ("mean", "worst10"):
            for b, b_runs in base.items():
                diff = _median(runs, label, key) - _median(b_runs, b, key)
                cells.append("" if b == label else f"{100 * diff:+5.1f}")
        cells.append(f"{statistics.median(r.get('cpu_seconds', math.nan) for r in runs):.0f}")
        rows.append(cells)
    headers = ["method", "seeds", "last mean", "last w10%", "sel. mean", "sel. w10%", "sel. val"]
    headers += [f"{k} vs {'FedAvg' if b == 'FedAvg (global)' else 'local'}"
                for k in ("mean", "w10") for b in base]  # fmt: skip
    out(table([*headers, "cpu s/run"], rows))
    out(
        "(sel.: the round, for local-only the epoch count, with the best mean validation "
        "accuracy; 'vs' columns: selected-round medians minus the baseline's, in points)"
    )
    personal = {k: v for k, v in results.items() if k not in BASELINES}
    if not personal or len(base) < 2:
        return
    best = max(personal, key=lambda k: _median(personal[k], k, "val_mean"))
    b = {k: _median(personal[best], best, k) for k in ("mean", "worst10")}
    g = {k: _median(base["FedAvg (global)"], "FedAvg (global)", k) for k in ("mean",)}
    lo = {k: _median(base["local only"], "local only", k) for k in ("mean", "worst10")}
    ft_label = "FedAvg + fine-tuning"
    ft = _median(results[ft_label], ft_label, "mean") if ft_label in results else b["mean"]
    checks = [
        (f"{best} - global FedAvg, mean", b["mean"] - g["mean"], 0.10),
        (f"{best} - local only, mean", b["mean"] - lo["mean"], 0.03),
        (f"{best} - local only, worst10%", b["worst10"] - lo["worst10"], 0.05),
        (f"{best} - {ft_label}, mean", b["mean"] - ft, 0.0),
    ]
    out(f"best personalized method (highest median validation accuracy): {best}")
    for text, diff, need in checks:
        verdict = "ok" if diff >= need - 1e-12 else "MISSED"
        out(f"  {text}: {100 * diff:+.1f} points (target >= {100 * need:+.0f}) {verdict}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
