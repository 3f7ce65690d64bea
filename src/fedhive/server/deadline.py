"""Synchronous rounds for stragglers: a round deadline, over-selection, partial work.

A run policy (:mod:`fedhive.server.policy`). Each round the strategy samples as usual, but
through a view that asks for ``1 + over_selection`` times as many clients (Bonawitz et al.,
"Towards Federated Learning at Scale: System Design", MLSys 2019, select 130% and keep
the first 100%). The round folds results in the order they arrive and ends when as many
results as the strategy asked for have come, or at ``deadline_s`` (seconds on the
engine's clock after the tasks were sent), whichever is first; tasks still running are
dropped: the over-selected ones are recorded as ``fit.discarded``, those cut by the
deadline as timeout failures. ``partial_work=True`` sends each client the seconds it
has (fit config ``"deadline_s"``), so a slow client trains fewer epochs and still
arrives in time (FedProx's variable local work, Li et al. 2020; simulated clients do it
through :class:`~fedhive.simulation.system.SystemModel`).

Results fold in arrival order: on a :class:`~fedhive.common.clock.VirtualClock` with
simulated latencies that order, and so the run, follows from the seed.

Example::

    policy = DeadlineRounds(deadline_s=60.0, over_selection=0.3)
    start_simulation(..., policy=policy, system=SystemModel(sigma=1.5))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fedhive.common.errors import ConfigError
from fedhive.common.message import Message, MessageType, derive_seed
from fedhive.common.records import FitIns
from fedhive.server.client_manager import ClientManager, ClientProxy, Criterion
from fedhive.server.engine import Engine, RoundDriver, end_fit_round, failure_record
from fedhive.server.policy import RunPolicy
from fedhive.server.stages import PlainExchange
from fedhive.transport.base import Replies

__all__ = ["DEADLINE_KEY", "DeadlineRounds"]

#: Fit config key telling a client the seconds it has (partial work).
DEADLINE_KEY = "deadline_s"


class _OverSelect:
    """A client manager whose ``sample`` asks for ``factor`` times as many clients and
    remembers how many the strategy wanted."""

    def __init__(self, manager: ClientManager, factor: float) -> None:
        self.manager = manager
        self.factor = factor
        self.wanted = 0

    def num_available(self) -> int:
        return self.manager.num_available()

    def all(self) -> dict[str, ClientProxy]:
        return self.manager.all()

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        self.wanted += num_clients
        more = min(math.ceil(num_clients * self.factor - 1e-9), self.manager.num_available())
        return self.manager.sample(max(more, num_clients), min_num_clients, criterion)


@dataclass
class DeadlineRounds(RunPolicy):
    """Synchronous rounds with ``deadline_s``, ``over_selection`` and ``partial_work``
    (see the module docstring). ``deadline_s=None``: no deadline (only over-selection)."""

    name: ClassVar[str] = "deadline"

    deadline_s: float | None = None
    over_selection: float = 0.0
    partial_work: bool = False

    def __post_init__(self) -> None:
        d = self.deadline_s
        if d is not None and (
            isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d < math.inf
        ):
            raise ConfigError(f"deadline_s must be None or a finite number > 0, got {d!r}")
        o = self.over_selection
        if isinstance(o, bool) or not isinstance(o, int | float) or not 0 <= o <= 10:
            raise ConfigError(
                f"over_selection must be a number in [0, 10] (0.3: ask for 130%), got {o!r}"
            )
        if self.partial_work and d is None:
            raise ConfigError("partial_work needs a deadline_s (the time a client may work)")

    def check(self, engine: Engine) -> None:
        if engine.fit_workflow != engine.pipeline_round:
            raise ConfigError(
                "a deadline round folds replies as they arrive; a custom fit_workflow cannot"
            )
        if not isinstance(engine.pipeline.exchange, PlainExchange):
            raise ConfigError(
                f"the exchange stage {engine.pipeline.exchange.name!r} needs every sampled "
                "client's reply; it cannot run with a deadline or over-selection"
            )

    def drive(self, engine: Engine, until: int) -> None:
        while engine.current_round < until:
            self._round(engine, engine.current_round + 1)

    def _round(self, engine: Engine, rnd: int) -> None:
        driver = RoundDriver(engine, rnd, {"round": rnd})
        engine.reseed_sampling(rnd, "fit")
        view = _OverSelect(engine.client_manager, 1.0 + self.over_selection)
        instructions = engine.strategy.configure_fit(rnd, engine.parameters, view)
        target = min(view.wanted, len(instructions)) if view.wanted else len(instructions)
        fit: dict[str, object] = {
            "num_clients": len(instructions),
            "num_results": 0,
            "metrics": {},
            "wanted": target,
        }
        driver.record["fit"] = fit
        if not instructions:
            fit["updated"] = False
            fit["note"] = "configure_fit selected no clients; the model is unchanged"
            engine.finish_round(driver.record)
            return
        aggregator, sink = engine.pipeline.prepare(driver, fit)
        tasks = [self._task(engine, rnd, client, ins) for client, ins in instructions]
        pending = {t.metadata.message_id: t for t in tasks}
        replies = Replies(engine.clock)
        limits = [x for x in (self.deadline_s, engine.config.round_timeout) if x is not None]
        deadline = engine.clock.now() + min(limits) if limits else None
        engine.transport.send(tasks, replies)
        kept = 0
        try:
            while pending and kept < target:
                reply = replies.get(deadline)
                if reply is None:
                    break
                accepted = engine.accept_reply(reply, pending)
                del reply
                if accepted is not None and sink.add_reply(accepted):
                    kept += 1
                del accepted
        finally:
            replies.cancel()
        late = list(pending.values())
        if kept >= target:
            fit["discarded"] = len(late)  # over-selected, not needed
        else:
            for task in late:
                sink.add_reply(
                    task.error_reply(f"no reply within the round deadline of {min(limits)} s")
                )
        driver.record["failures"] = [failure_record(f) for f in sink.failures]
        fit["num_failures"] = len(sink.failures)
        end_fit_round(driver, fit, aggregator.finalize)
        engine.finish_round(driver.record)

    def _task(self, engine: Engine, rnd: int, client: ClientProxy, ins: FitIns) -> Message:
        if self.partial_work and self.deadline_s is not None:
            ins = FitIns(
                ins.parameters, {**ins.config, DEADLINE_KEY: float(self.deadline_s)}, ins.extras
            )
        return Message.task(
            run_id=engine.run_id,
            node_id=client.cid,
            server_round=rnd,
            model_version=engine.model_version,
            message_type=MessageType.FIT,
            content=ins,
            seed=derive_seed(engine.seed, rnd, client.cid, MessageType.FIT),
        )

    def __repr__(self) -> str:
        return (
            f"DeadlineRounds(deadline_s={self.deadline_s}, over_selection={self.over_selection}, "
            f"partial_work={self.partial_work})"
        )
