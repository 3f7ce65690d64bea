"""What a client knows about itself: its node, its partition and its persistent state."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedhive.common.records import RecordDict, Scalar

__all__ = ["Context"]


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
