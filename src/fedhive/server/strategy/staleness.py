"""What asynchronous strategies share: staleness functions and the versions clients train on.

An asynchronous result was trained on an older model version than the current one; its
*staleness* ``tau`` is the number of versions published since its task was sent. The
strategies weigh it by a staleness function ``s(tau)``:

- ``"constant"``: ``s(tau) = 1``;
- ``"poly"`` (polynomial): ``s(tau) = (1 + tau) ** -a`` (FedBuff's default, ``a = 0.5``);
- ``"hinge"``: ``s(tau) = 1`` for ``tau <= b``, else ``1 / (a (tau - b) + 1)``.

The three come from Xie, Koyejo, Gupta, "Asynchronous Federated Optimization" (2019,
section 5.2); Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation"
(AISTATS 2022) use the polynomial one.

:class:`VersionLedger` remembers which model version each client's task was trained on
(from ``configure_fit``) and keeps each such version's arrays while a task on it is in
flight: memory is at most one model per distinct version in flight (at most
``concurrency`` models, usually a few).

Example::

    s = StalenessFunction("poly", exponent=0.5)
    s(0), s(3)  # (1.0, 0.5)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fedhive.common.errors import CheckpointError, ConfigError
from fedhive.common.records import NDArrays

__all__ = ["STALENESS_KINDS", "StalenessFunction", "VersionLedger"]

STALENESS_KINDS = ("constant", "poly", "hinge")


@dataclass(frozen=True)
class StalenessFunction:
    """``s(tau)``, see the module docstring. ``exponent`` is ``a``, ``hinge_at`` is ``b``."""

    kind: Literal["constant", "poly", "hinge"] = "poly"
    exponent: float = 0.5
    hinge_at: int = 4

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ConfigError(f"staleness must be one of {STALENESS_KINDS}, got {self.kind!r}")
        a = self.exponent
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0 <= a < float("inf"):
            raise ConfigError(f"staleness_exponent must be a finite number >= 0, got {a!r}")
        b = self.hinge_at
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ConfigError(f"staleness_hinge must be an int >= 0, got {b!r}")

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness cannot be negative, got {staleness}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "poly":
            return float((1.0 + staleness) ** -self.exponent)
        if staleness <= self.hinge_at:
            return 1.0
        return 1.0 / (self.exponent * (staleness - self.hinge_at) + 1.0)


@dataclass
class VersionLedger:
    """The model version each client trains on, and those versions' arrays.

    ``version`` counts the models the strategy has published. :meth:`dispatched` notes a
    task sent to a client on the current version; :meth:`arrived` takes that note back
    (each task is answered once) and gives ``(base version, staleness, base arrays)``.
    A version's arrays are dropped once no task on it is in flight and it is not the
    current one.
    """

    version: int = 0
    current: NDArrays | None = None
    bases: dict[str, int] = field(default_factory=dict)
    models: dict[int, NDArrays] = field(default_factory=dict)

    def install(self, arrays: NDArrays, version: int | None = None) -> None:
        """The current model (at ``version``, default the next one)."""
        self.version = self.version + 1 if version is None else version
        self.current = arrays
        self._prune()

    def dispatched(self, client_id: str, arrays: NDArrays) -> None:
        if self.current is None:
            self.current = arrays
        self.bases[client_id] = self.version
        self.models[self.version] = self.current

    def arrived(self, client_id: str) -> tuple[int, int, NDArrays] | None:
        base = self.bases.pop(client_id, None)
        if base is None:
            return None
        arrays = self.models[base]
        self._prune()
        return base, self.version - base, arrays

    def forget(self, client_id: str) -> None:
        """The client's task failed: no result will come."""
        self.bases.pop(client_id, None)
        self._prune()

    def _prune(self) -> None:
        used = set(self.bases.values())
        for version in [v for v in self.models if v not in used and v != self.version]:
            del self.models[version]

    def clear_in_flight(self) -> None:
        """Tasks sent before a restart will not be folded (their run id is stale)."""
        self.bases.clear()
        self._prune()

    def restore(self, meta: Mapping[str, object] | None, strategy: str) -> None:
        """Resume from the checkpoint record ``meta`` (``{"version": n}``, or none kept)
        of ``strategy``: the version counter comes back, tasks in flight do not."""
        if meta is not None:
            version = meta.get("version")
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise CheckpointError(
                    f"a {strategy} checkpoint needs a version >= 0, got {dict(meta)!r}"
                )
            self.version = version
        self.clear_in_flight()
