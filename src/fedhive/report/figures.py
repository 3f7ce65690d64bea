"""The plots of a report, as data: what both the HTML page (inline SVG) and the PNGs
(matplotlib) draw, so the two show the same figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedhive.report.runs import (
    Run,
    client_accuracies,
    epsilon_points,
    failure_counts,
    metric_points,
)

__all__ = ["Box", "Figure", "Series", "figures"]

#: How an axis's numbers read: rounds, bytes (kB, MB), seconds, or plain numbers.
AxisKind = Literal["round", "bytes", "seconds", "number"]


@dataclass(frozen=True)
class Series:
    """One line (or one run's bars): ``run`` is the run's index, which picks its colour."""

    label: str
    run: int
    x: tuple[float, ...]
    y: tuple[float, ...]
    dashed: bool = False


@dataclass(frozen=True)
class Box:
    """One box of a distribution plot: the per-client values of one run and model."""

    label: str
    run: int
    values: tuple[float, ...]
    hatched: bool = False


@dataclass(frozen=True)
class Figure:
    """One plot. ``kind`` is ``"line"`` (``series``), ``"bar"`` (``series`` of counts per
    round) or ``"box"`` (``boxes``). ``empty`` says why there is nothing to draw (then
    the page shows that sentence instead of a plot, and no PNG is written)."""

    key: str
    title: str
    x_label: str
    y_label: str
    kind: Literal["line", "bar", "box"] = "line"
    x_kind: AxisKind = "round"
    y_kind: AxisKind = "number"
    series: tuple[Series, ...] = ()
    boxes: tuple[Box, ...] = ()
    empty: str = ""
    note: str = ""


#: The two evaluations a round may record, and how the legend names them.
_SOURCES = (("centralized", "server test set", False), ("distributed", "client validation", True))
_AXES: dict[str, tuple[str, AxisKind, str]] = {
    "round": ("round", "round", ""),
    "bytes_up": ("uplink bytes (cumulative)", "bytes", ""),
    "virtual_time_s": (
        "virtual time",
        "seconds",
        "no run recorded virtual time (it is recorded under a simulated clock: the [system] "
        "table of fedhive run)",
    ),
}


def _metric_figure(runs: Sequence[Run], metric: str, axis: str) -> Figure:
    x_label, x_kind, missing = _AXES[axis]
    series = []
    for index, run in enumerate(runs):
        for source, name, dashed in _SOURCES:
            points = metric_points(run, source, metric, axis)
            if points:
                xs, ys = zip(*points, strict=True)
                series.append(Series(f"{run.name} ({name})", index, xs, ys, dashed))
    empty = ""
    if not series:
        empty = missing or f"no run recorded a {metric}"
    return Figure(
        key=f"{metric}-{axis.replace('_', '-')}",
        title=f"{metric.capitalize()} vs {x_label}",
        x_label=x_label,
        y_label=metric,
        x_kind=x_kind,
        series=tuple(series),
        empty=empty,
    )


def _privacy_figure(runs: Sequence[Run]) -> Figure:
    series = []
    for index, run in enumerate(runs):
        points = epsilon_points(run)
        if points:
            xs, ys = zip(*points, strict=True)
            series.append(Series(run.name, index, xs, ys))
    return Figure(
        key="epsilon-round",
        title="Privacy spent (epsilon) vs round",
        x_label="round",
        y_label="epsilon (user-level)",
        series=tuple(series),
        empty=""
        if series
        else "no run recorded epsilon (a run with a differential privacy "
        'strategy records it in every round\'s fit metrics, "epsilon")',
    )


def _failure_figure(runs: Sequence[Run]) -> Figure:
    series = []
    for index, run in enumerate(runs):
        counts = failure_counts(run)
        if counts:
            xs, ys = zip(*counts, strict=True)
            series.append(Series(run.name, index, xs, ys))
    total = sum(sum(s.y) for s in series)
    return Figure(
        key="failures-round",
        title="Client failures per round (fit and evaluate)",
        x_label="round",
        y_label="failures",
        kind="bar",
        series=tuple(series),
        empty="" if series else "no run has rounds with clients",
        note="" if total or not series else "no client failed in any run",
    )


def _distribution_figure(runs: Sequence[Run]) -> Figure:
    boxes = []
    rounds = []
    for index, run in enumerate(runs):
        found = client_accuracies(run)
        if found is None:
            continue
        rnd, models = found
        rounds.append(f"{run.name}: round {rnd}")
        personalized = len(models) > 1
        for model, values in models.items():
            label = f"{run.name}\n{model}"
            hatched = personalized and model.startswith("global")
            boxes.append(Box(label, index, tuple(values), hatched=hatched))
    return Figure(
        key="client-accuracy",
        title="Per-client accuracy at the last evaluated round",
        x_label="run and model",
        y_label="accuracy",
        kind="box",
        boxes=tuple(boxes),
        empty="" if boxes else "no run recorded per-client evaluation results",
        note="; ".join(rounds)
        + (". test: each client's own test split; valid.: its validation data" if rounds else ""),
    )


def figures(runs: Sequence[Run]) -> list[Figure]:
    """Every plot of the report of ``runs``, in page order."""
    out = []
    for metric in ("accuracy", "loss"):
        for axis in ("round", "bytes_up", "virtual_time_s"):
            out.append(_metric_figure(runs, metric, axis))
    out.append(_privacy_figure(runs))
    out.append(_distribution_figure(runs))
    out.append(_failure_figure(runs))
    return out
