"""Run folders read back: the ``history.json`` (and ``config.toml``) that ``fedhive run``
and ``fedhive server`` write, and the figures a report takes from their round records."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhive.common.errors import ConfigError

__all__ = [
    "Run",
    "client_accuracies",
    "config_differences",
    "epsilon_points",
    "failure_counts",
    "failure_reasons",
    "flatten",
    "load_run",
    "load_runs",
    "metric_points",
    "summary",
]


@dataclass(frozen=True)
class Run:
    """One run: its label in the report, its folder, its resolved config and its rounds."""

    name: str
    path: Path
    config: Mapping[str, Any]
    rounds: tuple[Mapping[str, Any], ...]


def _read_history(path: Path) -> dict[str, Any]:
    folder = path.parent if path.is_file() else path
    history = folder / "history.json"
    if not folder.is_dir():
        raise ConfigError(f"{path}: no such run folder")
    if not history.is_file():
        raise ConfigError(
            f"{folder}: no history.json there (give the output folder of fedhive run or "
            "fedhive server, or a folder holding History.to_json())"
        )
    try:
        data = json.loads(history.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{history}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise ConfigError(f'{history}: expected an object with a "rounds" list')
    for index, record in enumerate(data["rounds"]):
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise ConfigError(f'{history}: rounds[{index}] is not a record with an integer "round"')
    return data


def _read_config(folder: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    config = data.get("config")
    if isinstance(config, dict) and config:
        return config
    saved = folder / "config.toml"
    if saved.is_file():
        try:
            return tomllib.loads(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{saved}: not a readable TOML file ({exc})") from None
    return {}


def load_run(path: str | Path, name: str | None = None) -> Run:
    """The run saved in folder ``path`` (or its ``history.json``); :class:`ConfigError`
    naming the file when it is missing or malformed."""
    path = Path(path)
    data = _read_history(path)
    folder = path.parent if path.is_file() else path
    rounds = tuple(sorted(data["rounds"], key=lambda r: int(r["round"])))
    return Run(name or folder.resolve().name, folder, _read_config(folder, data), rounds)


def _labels(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the runs apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i + 1})" for i, label in enumerate(labels)]


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The runs in ``paths``, each labelled by the end of its path that is its own."""
    if not paths:
        raise ConfigError("give at least one run folder")
    folders = [Path(p) for p in paths]
    folders = [f.parent if f.is_file() else f for f in folders]
    return [load_run(f, label) for f, label in zip(folders, _labels(folders), strict=True)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metric(record: Mapping[str, Any], source: str, metric: str) -> float | None:
    part = record.get(source)
    if not isinstance(part, Mapping):
        return None
    if source == "centralized" or metric == "loss":
        return _number(part.get(metric))
    metrics = part.get("metrics")
    return _number(metrics.get(metric)) if isinstance(metrics, Mapping) else None


def _walk(run: Run) -> Iterator[tuple[Mapping[str, Any], dict[str, float]]]:
    """Each record with its x positions: round, cumulative uplink bytes, virtual time."""
    uplink = 0.0
    for record in run.rounds:
        uplink += _number(record.get("bytes_up")) or 0.0
        where = {"round": float(record["round"]), "bytes_up": uplink}
        virtual = _number(record.get("virtual_time_s"))
        if virtual is not None:
            where["virtual_time_s"] = virtual
        yield record, where


def metric_points(run: Run, source: str, metric: str, axis: str) -> list[tuple[float, float]]:
    """``(x, value)`` of ``metric`` (``"accuracy"``, ``"loss"``) of evaluation ``source``
    (``"centralized"``: the server's test set; ``"distributed"``: the clients' own data)
    against ``axis`` (``"round"``, ``"bytes_up"`` cumulative, ``"virtual_time_s"``)."""
    points = []
    for record, where in _walk(run):
        value = _metric(record, source, metric)
        if value is not None and axis in where:
            points.append((where[axis], value))
    return points


def _fit_metrics(record: Mapping[str, Any]) -> Mapping[str, Any]:
    fit = record.get("fit")
    metrics = fit.get("metrics") if isinstance(fit, Mapping) else None
    return metrics if isinstance(metrics, Mapping) else {}


def epsilon_points(run: Run) -> list[tuple[float, float]]:
    """``(round, epsilon)``: the privacy spent up to each round (the fit metric
    ``"epsilon"`` of a differential privacy strategy)."""
    points = []
    for record in run.rounds:
        value = _number(_fit_metrics(record).get("epsilon"))
        if value is None:
            value = _number(record.get("epsilon"))
        if value is not None:
            points.append((float(record["round"]), value))
    return points


def _failures(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = [f for f in record.get("failures") or () if isinstance(f, Mapping)]
    dist = record.get("distributed")
    if isinstance(dist, Mapping):
        found += [f for f in dist.get("failures") or () if isinstance(f, Mapping)]
    return found


def failure_counts(run: Run) -> list[tuple[float, float]]:
    """``(round, failures)`` of every round that asked clients for something."""
    out = []
    for record in run.rounds:
        if record["round"] == 0 and not _failures(record):
            continue  # the initial evaluation asks no client
        out.append((float(record["round"]), float(len(_failures(record)))))
    return out


def failure_reasons(run: Run) -> list[tuple[str, str, int, list[int]]]:
    """``(stage, reason, count, rounds)`` of the run's failures, most frequent first."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for record in run.rounds:
        for failure in _failures(record):
            reason = " ".join(str(failure.get("reason", "")).split())[:300]
            key = (str(failure.get("stage", "?")), reason)
            grouped.setdefault(key, []).append(int(record["round"]))
    rows = [(s, r, len(rounds), sorted(set(rounds))) for (s, r), rounds in grouped.items()]
    return sorted(rows, key=lambda row: -row[2])


def _accuracies(rows: Any, key: str) -> list[float]:
    values = []
    for row in rows if isinstance(rows, list) else ():
        if isinstance(row, Mapping):
            value = row.get(key)
            if value is None and isinstance(row.get("metrics"), Mapping):
                value = row["metrics"].get(key)
            number = _number(value)
            if number is not None:
                values.append(number)
    return values


def client_accuracies(run: Run) -> tuple[int, dict[str, list[float]]] | None:
    """The per-client accuracies of the last round that has them: of a personalized run,
    the personal and the global model on each client's test split; otherwise the global
    model on each client's validation data (the keys say which: ``"personal (test)"``,
    ``"global (test)"``, ``"global (valid.)"``). ``None`` if no round has any."""
    for record in reversed(run.rounds):
        personal, shared = record.get("personalized"), record.get("global")
        if isinstance(personal, Mapping) and isinstance(shared, Mapping):
            models = {
                "personal (test)": _accuracies(personal.get("clients"), "accuracy"),
                "global (test)": _accuracies(shared.get("clients"), "accuracy"),
            }
            if any(models.values()):
                return int(record["round"]), {k: v for k, v in models.items() if v}
        dist = record.get("distributed")
        if isinstance(dist, Mapping):
            values = _accuracies(dist.get("clients"), "accuracy")
            if values:
                return int(record["round"]), {"global (valid.)": values}
    return None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"strategy.name": "fedavg", ...}``: nested tables as dotted keys (a key set to
    ``None``, such as a table the run does not have, is left out)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


#: Config keys that name where a run was written, not what it did.
_WHERE = frozenset({"out", "checkpoint_dir"})


def config_differences(runs: Sequence[Run]) -> tuple[list[str], dict[str, Any]]:
    """The dotted config keys whose values differ between ``runs`` (a key one run lacks
    differs), and the keys all share with their common value."""
    flat = [flatten(run.config) for run in runs]
    keys = sorted({k for f in flat for k in f} - _WHERE)
    missing = object()
    differ, same = [], {}
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if all(v == values[0] for v in values) and values[0] is not missing:
            same[key] = values[0]
        else:
            differ.append(key)
    return differ, same


def summary(run: Run) -> dict[str, Any]:
    """The run's figures at a glance: rounds, final and best accuracy, final loss, bytes,
    virtual time, final epsilon and failures (``None`` where the run has no such figure)."""

    def last(points: list[tuple[float, float]]) -> float | None:
        return points[-1][1] if points else None

    source = "centralized" if metric_points(run, "centralized", "accuracy", "round") else None
    source = source or "distributed"
    accuracy = metric_points(run, source, "accuracy", "round")
    virtual = [w.get("virtual_time_s") for _, w in _walk(run)]
    return {
        "rounds": max((int(r["round"]) for r in run.rounds), default=0),
        "evaluation": "server test set" if source == "centralized" else "client validation",
        "final_accuracy": last(accuracy),
        "best_accuracy": max((v for _, v in accuracy), default=None),
        "final_loss": last(metric_points(run, source, "loss", "round")),
        "bytes_up": sum(_number(r.get("bytes_up")) or 0 for r in run.rounds),
        "bytes_down": sum(_number(r.get("bytes_down")) or 0 for r in run.rounds),
        "virtual_time_s": next((v for v in reversed(virtual) if v is not None), None),
        "epsilon": last(epsilon_points(run)),
        "failures": int(sum(n for _, n in failure_counts(run))),
    }
