"""What happened in a run, round by round.

``History`` keeps Flower's attributes (``losses_distributed``, ``losses_centralized``,
``metrics_distributed_fit``, ``metrics_distributed``, ``metrics_centralized``) and one
record per round, exported as JSON::

    {"config": {...}, "rounds": [{"round": 1, "elapsed_s": 0.8,
      "centralized": {"loss": 0.4, "accuracy": 0.9},
      "distributed": {"loss": 0.5, "accuracy": 0.88, "clients": [...]},
      "fit": {"num_results": 10, "num_failures": 0, ...}, "failures": [...]}, ...]}

Per-client evaluation results are kept under ``distributed.clients``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from fedhive.common.records import Scalar

__all__ = ["History"]

TIMING_KEYS = frozenset({"elapsed_s", "duration_s"})
#: Bytes on the wire per round (``bytes_up``, ``bytes_down``, per client in
#: ``bytes_clients``): exact, but they include message ids, which number the messages of
#: a process, so equal-seed runs may differ in them by a few bytes per message.
WIRE_KEYS = frozenset({"bytes_up", "bytes_down", "bytes_clients"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _unjsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes__"}:
            return bytes.fromhex(value["__bytes__"])
        return {k: _unjsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjsonable(v) for v in value]
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return value


class History:
    """Losses and metrics per round (Flower's fields) plus full round records."""

    def __init__(self) -> None:
        self.losses_distributed: list[tuple[int, float]] = []
        self.losses_centralized: list[tuple[int, float]] = []
        self.metrics_distributed_fit: dict[str, list[tuple[int, Scalar]]] = {}
        self.metrics_distributed: dict[str, list[tuple[int, Scalar]]] = {}
        self.metrics_centralized: dict[str, list[tuple[int, Scalar]]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.config: dict[str, Any] = {}
        #: Called with each new round record before it is added (and so before it is
        #: saved): a feature adds its summaries (personalization's per-client figures).
        self.record_hooks: list[Callable[[dict[str, Any]], None]] = []

    # Flower's recording methods
    def add_loss_distributed(self, server_round: int, loss: float) -> None:
        self.losses_distributed.append((server_round, loss))

    def add_loss_centralized(self, server_round: int, loss: float) -> None:
        self.losses_centralized.append((server_round, loss))

    def add_metrics_distributed_fit(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        for key, value in metrics.items():
            self.metrics_distributed_fit.setdefault(key, []).append((server_round, value))

    def add_metrics_distributed(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        for key, value in metrics.items():
            self.metrics_distributed.setdefault(key, []).append((server_round, value))

    def add_metrics_centralized(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        for key, value in metrics.items():
            self.metrics_centralized.setdefault(key, []).append((server_round, value))

    def add_round(self, record: dict[str, Any]) -> None:
        """Add one round's record (after :attr:`record_hooks` saw it) and fill Flower's
        fields from it."""
        for hook in self.record_hooks:
            hook(record)
        rnd = int(record["round"])
        central = record.get("centralized")
        if central:
            self.add_loss_centralized(rnd, central["loss"])
            self.add_metrics_centralized(rnd, {k: v for k, v in central.items() if k != "loss"})
        dist = record.get("distributed")
        if dist and dist.get("loss") is not None:
            self.add_loss_distributed(rnd, dist["loss"])
        if dist:
            self.add_metrics_distributed(rnd, dist.get("metrics", {}))
        fit = record.get("fit")
        if fit:
            self.add_metrics_distributed_fit(rnd, fit.get("metrics", {}))
        self.rounds.append(record)

    def bytes_totals(self) -> dict[str, int]:
        """Bytes sent up (clients to server) and down over the whole run."""
        return {
            "bytes_up": sum(int(r.get("bytes_up", 0)) for r in self.rounds),
            "bytes_down": sum(int(r.get("bytes_down", 0)) for r in self.rounds),
        }

    # export
    def to_dict(self) -> dict[str, Any]:
        return {"config": _jsonable(self.config), "rounds": _jsonable(self.rounds)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        history = cls()
        history.config = _unjsonable(dict(data.get("config", {})))
        for record in _unjsonable(list(data.get("rounds", []))):
            history.add_round(record)
        return history

    def without_timings(self) -> dict[str, Any]:
        """The JSON form minus wall-clock fields (and the byte counts, see
        :data:`WIRE_KEYS`): what must match across equal-seed runs."""
        skip = TIMING_KEYS | WIRE_KEYS

        def strip(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items() if k not in skip}
            if isinstance(value, list):
                return [strip(v) for v in value]
            return value

        return strip(self.to_dict())

    def __repr__(self) -> str:
        lines = [f"History ({len(self.rounds)} rounds)"]
        if self.losses_distributed:
            lines.append(f"  loss, distributed: {self.losses_distributed}")
        if self.losses_centralized:
            lines.append(f"  loss, centralized: {self.losses_centralized}")
        for name, series in self.metrics_centralized.items():
            lines.append(f"  {name}, centralized: {series}")
        for name, series in self.metrics_distributed.items():
            lines.append(f"  {name}, distributed: {series}")
        return "\n".join(lines)
