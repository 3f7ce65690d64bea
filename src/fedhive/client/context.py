"""What a client knows about itself: its node, its partition and its persistent state."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedhive.common.records import RecordDict, Scalar

__all__ = ["Context", "HasContext"]


@dataclass
class Context:
    """A client's context, as in Flower >= 1.10.

    ``state`` persists across rounds even though virtual clients are rebuilt for every
    task; write into it (``context.state.array_records["residual"] = {...}``) and the next
    task for this client sees it. ``node_config`` holds ``"partition-id"`` and
    ``"num-partitions"`` in simulation. ``seed`` is this task's seed, derived from (run seed,
    round, client, stage): draw randomness from :attr:`rng` for reproducible runs.
    """

    node_id: str
    node_config: dict[str, Scalar] = field(default_factory=dict)
    state: RecordDict = field(default_factory=RecordDict)
    run_config: dict[str, Scalar] = field(default_factory=dict)
    seed: int = 0

    @property
    def rng(self) -> np.random.Generator:
        """A fresh generator seeded with this task's seed."""
        return np.random.default_rng(self.seed)


class HasContext:
    """The ``context`` attribute of clients, set by the runtime before each task."""

    _context: Context | None = None

    @property
    def context(self) -> Context:
        if self._context is None:
            raise AttributeError("the client has no context until the runtime sets one")
        return self._context

    @context.setter
    def context(self, value: Context) -> None:
        self._context = value

    def get_context(self) -> Context:
        return self.context

    def set_context(self, context: Context) -> None:
        self.context = context
