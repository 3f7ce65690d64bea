"""Per-client evaluation that means something, summarised in every round record.

Each evaluating client measures two models on its *own* held-out splits: its personal
model and the global one (the server's shared layers; personal layers at their initial
values, the only ones the server could know). It reports both on its validation and
test splits (:data:`METRIC_KEYS`). :class:`PersonalizationReport` turns a round's
per-client results into two summaries added to the round record of ``history.json``::

    "personalized": {"mean": ..., "weighted_mean": ..., "median": ..., "worst10": ...,
                     "std": ..., "clients": [{"client_id": "7", "num_examples": 40,
                     "accuracy": 0.9, "loss": 0.3, "val_accuracy": ..., "val_loss": ...,
                     "val_num_examples": ...}, ...]},
    "global": {... the same keys, the global model on the same splits ...}

The figures are test accuracies: ``mean`` over clients, ``weighted_mean`` by test
examples, ``median``, ``worst10`` (the mean of the worst 10% of clients, at least one),
``std`` (population standard deviation). :func:`report` gives the figures to quote: the
last round's and those of the round chosen on *validation* accuracy, never the best
round on test data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhive.common.records import Scalar
from fedhive.server.engine import RoundCallback

if TYPE_CHECKING:
    from fedhive.server.engine import Engine
    from fedhive.server.history import History

__all__ = [
    "METRIC_KEYS",
    "SUMMARY_KEYS",
    "PersonalizationReport",
    "client_metrics",
    "report",
    "summarize",
    "summarize_round",
]

#: Summary keys of ``personalized`` and ``global`` (exactly these).
SUMMARY_KEYS = ("mean", "weighted_mean", "median", "worst10", "std", "clients")
#: What a client reports for one model (prefix ``p_`` personal, ``g_`` global).
METRIC_KEYS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss")
_COUNTS = ("test_examples", "val_examples")


def client_metrics(
    personal: Mapping[str, float],
    global_: Mapping[str, float],
    test_examples: int,
    val_examples: int,
) -> dict[str, Scalar]:
    """The evaluate metrics of one client: both models on its val and test splits."""
    out: dict[str, Scalar] = {
        "test_examples": int(test_examples),
        "val_examples": int(val_examples),
    }
    for prefix, values in (("p_", personal), ("g_", global_)):
        for key in METRIC_KEYS:
            out[prefix + key] = float(values.get(key, math.nan))
    out["accuracy"] = out["p_test_accuracy"]
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``mean``, ``weighted_mean``, ``median``, ``worst10``, ``std`` of the rows' test
    ``accuracy`` (weighted by ``num_examples``) and the rows themselves as ``clients``."""
    acc = np.array([float(r["accuracy"]) for r in rows], dtype=np.float64)
    weights = np.array([float(r["num_examples"]) for r in rows], dtype=np.float64)
    if acc.size == 0:
        nan = float("nan")
        return {"mean": nan, "weighted_mean": nan, "median": nan, "worst10": nan, "std": nan,
                "clients": []}  # fmt: skip
    worst = np.sort(acc)[: max(1, math.ceil(0.1 * acc.size))]
    total = weights.sum()
    return {
        "mean": float(acc.mean()),
        "weighted_mean": float((acc * weights).sum() / total) if total > 0 else float("nan"),
        "median": float(np.median(acc)),
        "worst10": float(worst.mean()),
        "std": float(acc.std()),
        "clients": [dict(r) for r in rows],
    }


def _rows(clients: Sequence[Mapping[str, Any]], prefix: str) -> list[dict[str, Any]]:
    rows = []
    for client in clients:
        m = client.get("metrics") or {}
        rows.append(
            {
                "client_id": str(client["client_id"]),
                "num_examples": int(m["test_examples"]),
                "accuracy": float(m[f"{prefix}test_accuracy"]),
                "loss": float(m[f"{prefix}test_loss"]),
                "val_accuracy": float(m[f"{prefix}val_accuracy"]),
                "val_loss": float(m[f"{prefix}val_loss"]),
                "val_num_examples": int(m["val_examples"]),
            }
        )
    return rows


def _reporting(client: Mapping[str, Any]) -> bool:
    m = client.get("metrics") or {}
    return all(f"{p}{k}" in m for p in ("p_", "g_") for k in METRIC_KEYS) and all(
        k in m for k in _COUNTS
    )


def summarize_round(record: dict[str, Any]) -> None:
    """Add ``personalized`` and ``global`` to a round record from its federated
    evaluation's per-client results (clients that did not report both models are left
    out); nothing when no client reported them or they are already there."""
    if "personalized" in record:
        return
    dist = record.get("distributed") or {}
    clients = [c for c in dist.get("clients") or [] if _reporting(c)]
    if not clients:
        return
    clients.sort(key=lambda c: _sort_key(str(c["client_id"])))
    record["personalized"] = summarize(_rows(clients, "p_"))
    record["global"] = summarize(_rows(clients, "g_"))


def _sort_key(cid: str) -> tuple[int, int | str]:
    return (0, int(cid)) if cid.isdigit() else (1, cid)


class PersonalizationReport(RoundCallback):
    """A round callback that adds ``personalized`` and ``global`` to every evaluated
    round's record, before the record is saved (history, checkpoint)."""

    def on_run_start(self, engine: Engine) -> None:
        hooks = engine.history.record_hooks
        if summarize_round not in hooks:
            hooks.append(summarize_round)


def _val_mean(rows: Sequence[Mapping[str, Any]]) -> float:
    """Mean validation accuracy over the clients that have a validation split (a client
    with too few samples for one reports NaN); NaN if none has."""
    clean = [v for v in (float(r["val_accuracy"]) for r in rows) if math.isfinite(v)]
    return float(np.mean(clean)) if clean else math.nan


def _figures(record: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"round": int(record["round"])}
    for name in ("personalized", "global"):
        summary = record[name]
        out[name] = {k: summary[k] for k in SUMMARY_KEYS if k != "clients"}
        out[name]["val_mean"] = _val_mean(summary["clients"])
    return out


def report(history: History | Mapping[str, Any]) -> dict[str, Any]:
    """The figures to quote from a run: ``last`` (the last evaluated round) and
    ``selected`` (the round with the highest mean *validation* accuracy of the personal
    models, the earliest on ties), each with the test summaries of both models.

    ``history`` is a :class:`~fedhive.server.history.History` or the dict of
    ``history.json``. Empty when no round has per-client summaries.
    """
    rounds = history["rounds"] if isinstance(history, Mapping) else history.rounds
    evaluated = [r for r in rounds if "personalized" in r and r["personalized"]["clients"]]
    if not evaluated:
        return {}

    def val_mean(record: Mapping[str, Any]) -> float:
        mean = _val_mean(record["personalized"]["clients"])
        return mean if math.isfinite(mean) else -math.inf

    best = max(evaluated, key=lambda r: (val_mean(r), -int(r["round"])))
    return {
        "last": _figures(evaluated[-1]),
        "selected": {**_figures(best), "selected_on": "mean validation accuracy (personal)"},
    }
