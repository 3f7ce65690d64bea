"""What ``fedhive run`` writes: history.json, metrics.csv, accuracy.png, config.toml."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fedhive.common.atomic import atomic_write_bytes
from fedhive.server.history import History

__all__ = [
    "CSV_COLUMNS",
    "CURVE_NAMES",
    "plot_title",
    "write_config",
    "write_history",
    "write_metrics_csv",
    "write_plot",
]

CSV_COLUMNS = (
    "round",
    "elapsed_s",
    "centralized_loss",
    "centralized_accuracy",
    "distributed_loss",
    "distributed_accuracy",
    "fit_loss",
    "num_fit_results",
    "num_failures",
)


def write_config(path: Path, config: dict[str, Any]) -> None:
    import tomli_w

    clean = {k: v for k, v in config.items() if v is not None}
    for key, value in list(clean.items()):
        if isinstance(value, dict):
            clean[key] = {k: v for k, v in value.items() if v is not None}
    atomic_write_bytes(path, tomli_w.dumps(clean).encode())


def write_history(path: Path, history: History, config: dict[str, Any]) -> None:
    data = {"config": config, "rounds": history.to_dict()["rounds"]}
    atomic_write_bytes(path, json.dumps(data, indent=2, allow_nan=False).encode())


def _row(record: dict[str, Any]) -> list[Any]:
    central = record.get("centralized") or {}
    dist = record.get("distributed") or {}
    fit = record.get("fit") or {}
    return [
        record["round"],
        round(float(record.get("elapsed_s", 0.0)), 4),
        central.get("loss", ""),
        central.get("accuracy", ""),
        "" if dist.get("loss") is None else dist["loss"],
        (dist.get("metrics") or {}).get("accuracy", ""),
        (fit.get("metrics") or {}).get("loss", ""),
        fit.get("num_results", ""),
        len(record.get("failures", [])) + len(dist.get("failures", [])),
    ]


def write_metrics_csv(path: Path, history: History) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in history.rounds:
        writer.writerow(_row(record))
    atomic_write_bytes(path, buffer.getvalue().encode())


#: The plot's names of the two evaluations: the server's model on its test split
#: (centralized) and the clients' own evaluation on their held-out data (federated).
CURVE_NAMES = {"centralized": "server test set", "federated": "client validation"}


def plot_title(dataset: str | None, strategy: str, seed: int) -> str:
    """``"mnist1d, fedavg, seed 0"``: what the plot is of."""
    data = dataset or "the clients' model"
    return f"{data}, {strategy}, seed {seed}"


def write_plot(path: Path, history: History, title: str | None = None) -> bool:
    """Loss and accuracy per round, of the server's test set (centralized evaluation)
    and of the clients' validation data (federated), under ``title``; False if there is
    nothing to plot."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = history.rounds
    if not rounds:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {"centralized": [], "federated": []}
    for r in rounds:
        series["centralized"].append((r["round"], r.get("centralized") or {}))
        dist = r.get("distributed") or {}
        series["federated"].append(
            (r["round"], {"loss": dist.get("loss"), **(dist.get("metrics") or {})})
        )
    for label, points in series.items():
        loss = [(x, d["loss"]) for x, d in points if d and d.get("loss") is not None]
        acc = [(x, d["accuracy"]) for x, d in points if d and d.get("accuracy") is not None]
        if loss:
            ax_loss.plot(*zip(*loss, strict=True), label=CURVE_NAMES[label])
        if acc:
            ax_acc.plot(*zip(*acc, strict=True), label=CURVE_NAMES[label])
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True
