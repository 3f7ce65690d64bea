"""What a client knows about itself, and the shape of client middleware.

:class:`Context` (node, partition, persistent state, the task's seed) and the ``Handler``
/ ``Mod`` signatures live here, below every package that names them: the client runtime
runs mods, and strategies declare the client mods they require (SCAFFOLD's).
``fedhive.client.context`` and ``fedhive.client.app`` re-export them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from fedhive.common.message import Message
from fedhive.common.records import RecordDict, Scalar

__all__ = ["Context", "Handler", "Mod"]


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


#: A client's message handler: ``handler(message, context) -> reply``.
Handler: TypeAlias = Callable[[Message, Context], Message]
#: Client middleware: ``mod(message, context, call_next) -> reply``.
Mod: TypeAlias = Callable[[Message, Context, Handler], Message]
