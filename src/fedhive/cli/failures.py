"""Client failures where people look: a line per reason and round on the console, a
warning for a round without a single fit result, and the test for a run that never had
one (``fedhive server`` and ``fedhive run`` then exit with :data:`NO_SUCCESS_EXIT`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.history import History

__all__ = [
    "NO_SUCCESS_EXIT",
    "FailureLog",
    "count_failures",
    "failure_lines",
    "no_success_message",
    "run_had_no_success",
    "zero_success_warning",
]

#: Exit status of a run in which no fit result ever succeeded.
NO_SUCCESS_EXIT = 1

_MAX_IDS = 5
_MAX_REASON = 500


def _failures(record: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """The round's fit failures, then its evaluate failures."""
    yield from record.get("failures") or ()
    yield from (record.get("distributed") or {}).get("failures") or ()


def count_failures(record: dict[str, Any]) -> int:
    """Fit and evaluate failures of one round record."""
    return sum(1 for _ in _failures(record))


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:_MAX_IDS])
    more = len(ids) - _MAX_IDS
    return shown + (f" and {more} more" if more > 0 else "")


def failure_lines(record: dict[str, Any]) -> list[str]:
    """One line per (stage, reason) of the round: how many clients, which, and why.

    ``round 2: fit failed on 2 clients (a, b): ValueError: bad input``.
    """
    grouped: dict[tuple[str, str], list[str]] = {}
    for failure in _failures(record):
        reason = " ".join(str(failure.get("reason", "")).split())
        if len(reason) > _MAX_REASON:
            reason = reason[:_MAX_REASON] + " ..."
        ids = grouped.setdefault((str(failure.get("stage", "?")), reason), [])
        cid = str(failure.get("client_id", "?"))
        if cid not in ids:
            ids.append(cid)
    lines = []
    for (stage, reason), ids in grouped.items():
        who = f"{len(ids)} client{'s' if len(ids) != 1 else ''} ({_ids(ids)})"
        lines.append(f"round {record['round']}: {stage} failed on {who}: {reason}")
    return lines


def zero_success_warning(record: dict[str, Any]) -> str | None:
    """The warning for a round in which clients were asked to fit and none succeeded."""
    fit = record.get("fit") or {}
    if not fit.get("num_clients") or fit.get("num_results", 0) > 0:
        return None
    return (
        f"round {record['round']}: no fit result succeeded ({fit['num_clients']} clients "
        "asked); the model is unchanged"
    )


def run_had_no_success(history: History) -> bool:
    """Whether the run asked clients to fit and not one fit result ever succeeded."""
    fits = [r.get("fit") or {} for r in history.rounds if r.get("round", 0) > 0]
    asked = any(f.get("num_clients") for f in fits)
    return asked and not any(f.get("num_results", 0) for f in fits)


def no_success_message(history: History) -> str:
    rounds = sum(1 for r in history.rounds if r.get("round", 0) > 0)
    return (
        f"no client's fit succeeded in {rounds} round{'s' if rounds != 1 else ''}: the final "
        "model is the initial one (the failure reasons are above)"
    )


class FailureLog(RoundCallback):
    """Prints each round's failure lines and its zero-success warning through ``emit``
    (``emit(text, warning)``)."""

    def __init__(self, emit: Callable[[str, bool], None]) -> None:
        self.emit = emit

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        for line in failure_lines(record):
            self.emit(line, False)
        warning = zero_success_warning(record)
        if warning is not None:
            self.emit(warning, True)
