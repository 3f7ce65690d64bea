"""Round callbacks for the terminal and for files written as the run goes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedhive.cli.failures import count_failures
from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.history import History

__all__ = ["ProgressBar", "EveryRound", "summary_table"]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _privacy(record: dict[str, Any]) -> str:
    """``"  eps 1.23"`` when a DP strategy reported epsilon this round, else ``""``."""
    metrics = (record.get("fit") or {}).get("metrics") or {}
    if "epsilon" not in metrics:
        return ""
    flag = " NOT PRIVATE" if metrics.get("dp_not_private") else ""
    return f"  eps {float(metrics['epsilon']):.3g}{flag}"


def _megabytes(count: int) -> str:
    """A byte count for people: ``"12.3 kB"``, ``"4.56 MB"``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


def _wire(history: History) -> str:
    """``"  up 1.2 MB down 3.4 MB"``: the bytes on the wire so far."""
    totals = history.bytes_totals()
    return f"  up {_megabytes(totals['bytes_up'])} down {_megabytes(totals['bytes_down'])}"


def _accuracy_and_loss(record: dict[str, Any]) -> tuple[Any, Any]:
    central = record.get("centralized") or {}
    dist = record.get("distributed") or {}
    acc = central.get("accuracy", (dist.get("metrics") or {}).get("accuracy"))
    loss = central.get("loss", dist.get("loss"))
    return acc, loss


class ProgressBar(RoundCallback):
    """A rich progress bar: round, accuracy, loss and ETA."""

    def __init__(self, total_rounds: int, console: Console | None = None) -> None:
        self.total = total_rounds
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn(
                "acc {task.fields[acc]}  loss {task.fields[loss]}{task.fields[eps]}"
                "{task.fields[wire]}"
            ),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task_id: Any = None
        self.eps = ""

    def on_run_start(self, engine: Engine) -> None:
        last = engine.history.rounds[-1] if engine.history.rounds else {}
        acc, loss = _accuracy_and_loss(last)
        self.eps = _privacy(last)
        self.progress.start()
        self.task_id = self.progress.add_task(
            "rounds",
            total=self.total,
            completed=engine.current_round,
            acc=_fmt(acc),
            loss=_fmt(loss),
            eps=self.eps,
            wire=_wire(engine.history),
        )

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        acc, loss = _accuracy_and_loss(record)
        self.eps = _privacy(record) or self.eps  # no DP release this round: keep the last
        self.progress.update(
            self.task_id,
            completed=record["round"],
            acc=_fmt(acc),
            loss=_fmt(loss),
            eps=self.eps,
            wire=_wire(engine.history),
        )

    def on_run_end(self, engine: Engine, history: History) -> None:
        self.progress.stop()


class EveryRound(RoundCallback):
    """Calls ``write(history)`` after every round (so an interrupted run leaves its files)."""

    def __init__(self, write: Callable[[History], None]) -> None:
        self.write = write
        self.started = time.perf_counter()

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self.write(engine.history)


def summary_table(history: History, out_dir: str) -> Table:
    table = Table(title="fedhive run: summary", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    rounds = [r for r in history.rounds if r["round"] > 0]
    if not rounds:
        table.add_row("rounds", "0")
        return table
    last = rounds[-1]
    acc, loss = _accuracy_and_loss(last)
    accs = [a for a, _ in map(_accuracy_and_loss, rounds) if a is not None]
    failures = sum(map(count_failures, rounds))  # fit and evaluate
    table.add_row("rounds", str(last["round"]))
    table.add_row("final accuracy", _fmt(acc))
    table.add_row("best accuracy", _fmt(max(accs) if accs else None))
    table.add_row("final loss", _fmt(loss))
    table.add_row("training time (s)", f"{float(last.get('elapsed_s', 0.0)):.1f}")
    table.add_row("client failures", str(failures))
    totals = history.bytes_totals()
    table.add_row("bytes up (clients to server)", f"{totals['bytes_up']:,}")
    table.add_row("bytes down (server to clients)", f"{totals['bytes_down']:,}")
    table.add_row("output", out_dir)
    return table
