"""Run policies: how the engine turns replies into model versions.

:meth:`Engine.run <fedhive.server.engine.Engine.run>` delegates its loop to a
:class:`RunPolicy`. :class:`SyncRounds` (the default) runs Flower's synchronous rounds;
:class:`~fedhive.server.asynchronous.BufferedAsync` keeps a pool of clients training and
publishes a model every K results (FedBuff's shape). Both finish every model version the
same way (:meth:`Engine.finish_round <fedhive.server.engine.Engine.finish_round>`):
centralized and federated evaluation, the history record, the checkpoint and the
callbacks. A policy's own state (``state_dict``) goes into every checkpoint and is
restored on resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from fedhive.common.errors import CheckpointError

if TYPE_CHECKING:
    from fedhive.server.engine import Engine
    from fedhive.server.strategy.base import Strategy

__all__ = ["RunPolicy", "SyncRounds", "default_policy"]


class RunPolicy(ABC):
    """Runs an engine until it has published ``until`` model versions (rounds)."""

    #: Recorded in history and checkpoints; a checkpoint resumes only under the same name.
    name: ClassVar[str] = "policy"

    @abstractmethod
    def drive(self, engine: Engine, until: int) -> None:
        """Run until ``engine.current_round == until``."""

    def check(self, engine: Engine) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~fedhive.common.errors.ConfigError` if this policy cannot run
        ``engine`` as configured (called when the engine is built)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state kept across model versions (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise CheckpointError(f"{self.name} keeps no state, the checkpoint has {state!r}")


class SyncRounds(RunPolicy):
    """Flower's synchronous rounds: sample, fit, aggregate, evaluate; then the next one."""

    name = "sync"

    def drive(self, engine: Engine, until: int) -> None:
        while engine.current_round < until:
            engine.run_round(engine.current_round + 1)

    def __repr__(self) -> str:
        return "SyncRounds()"


def default_policy(strategy: Strategy) -> RunPolicy:
    """The policy a run takes when none is given: for an asynchronous strategy (FedBuff,
    FedAsync) buffered asynchronous aggregation with its ``buffer_size``, ``concurrency``
    and ``max_staleness``; else synchronous rounds."""
    from fedhive.server.asynchronous import BufferedAsync
    from fedhive.server.strategy.asyncbase import AsynchronousStrategy

    if isinstance(strategy, AsynchronousStrategy):
        return BufferedAsync(
            buffer_size=strategy.buffer_size,
            concurrency=strategy.concurrency,
            max_staleness=strategy.max_staleness,
        )
    return SyncRounds()
