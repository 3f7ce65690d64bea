"""Real runs for the report tests: small ``fedhive run`` experiments written to folders
as the CLI writes them (history.json and config.toml), one of them with central DP."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedhive.cli.config import validate
from fedhive.cli.experiment import build_experiment, run_experiment
from fedhive.cli.output import write_config, write_history

#: The base run: logistic regression on digits, 8 clients, half of them per round.
BASE = {
    "rounds": 3,
    "num_clients": 8,
    "seed": 1,
    "data": {"dataset": "digits"},
    "model": {"name": "logreg"},
    "train": {"lr": 0.1, "local_epochs": 1},
    "strategy": {"fraction_fit": 0.5, "fraction_evaluate": 0.5},
}
#: Simulated devices: virtual time, and a task in five abandoned midway (failures).
SYSTEM = {"latency": "lognormal", "sigma": 1.0, "bandwidth_mbps": 10.0, "dropout": 0.2}


def write_run(folder: Path, overrides: dict, *, dp: bool = False) -> Path:
    """Run the base experiment with ``overrides`` (top-level keys replace the base's
    tables) and save it into ``folder``; with ``dp``, FedAvg inside DP-FedAvg (central
    DP, fixed clipping), so every round records the epsilon spent."""
    raw = {**BASE, **overrides, "out": folder.as_posix()}
    cfg = validate(raw)
    exp = build_experiment(cfg)
    if dp:
        from fedhive.privacy import Accounting, DifferentialPrivacyServerSideFixedClipping

        strategy = DifferentialPrivacyServerSideFixedClipping(
            exp.strategy, noise_multiplier=0.8, clipping_norm=1.0, num_sampled_clients=4,
            accounting=Accounting(delta=1e-3),
        )  # fmt: skip
        exp = dataclasses.replace(exp, strategy=strategy)
    history = run_experiment(exp)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump()
    write_config(folder / "config.toml", resolved)
    write_history(folder / "history.json", history, resolved)
    return folder


def three_runs(root: Path) -> list[Path]:
    """FedAvg on simulated devices, FedProx on the same devices, and DP-FedAvg."""
    return [
        write_run(root / "fedavg", {"system": SYSTEM}),
        write_run(
            root / "fedprox",
            {
                "system": SYSTEM,
                "strategy": {**BASE["strategy"], "name": "fedprox", "proximal_mu": 0.1},
            },
        ),
        write_run(root / "dp-fedavg", {"rounds": 4}, dp=True),
    ]
