"""The round engine: the same loop for simulation and deployment.

One round is: sample -> configure -> dispatch -> stream results into the strategy's
aggregator -> finalize -> centralized and federated evaluation. The engine reaches
clients only through a :class:`~fedhive.transport.base.Transport`, measures deadlines on
its own :class:`~fedhive.common.clock.Clock`, and checks that every reply belongs to this
run, round and task before anything is folded.

How model versions are made is a *run policy* (:mod:`fedhive.server.policy`):
synchronous rounds by default, or buffered asynchronous aggregation
(:class:`~fedhive.server.asynchronous.BufferedAsync`). Both finish each version with
:meth:`Engine.finish_round` (evaluation, history, checkpoint, callbacks).

A synchronous fit round is a pipeline of stages (:mod:`fedhive.server.stages`): an
exchange stage (Flower's single exchange, or SecAgg+), reply stages and aggregate stages,
checked against the strategy's traits when the engine is built. The exchange gets a
:class:`RoundDriver`, which can run any number of exchanges of any message type in a
round (secure aggregation's key agreement, share collection, ...). A custom *fit
workflow* (``fit_workflow=``, a callable taking the driver) still replaces the whole fit
round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedhive.common.clock import Clock, SystemClock, VirtualClock
from fedhive.common.errors import ClientFailure, ConfigError
from fedhive.common.heap import gc_frozen
from fedhive.common.message import Message, MessageType, derive_seed
from fedhive.common.records import (
    EvaluateRes,
    GetParametersIns,
    GetParametersRes,
    Parameters,
)
from fedhive.server.client_bytes import ClientBytes
from fedhive.server.client_manager import ClientManager, ClientProxy, SimpleClientManager
from fedhive.server.config import ServerConfig
from fedhive.server.fit_round import (
    begin_fit_round,
    default_fit_workflow,
    end_fit_round,
    failure_record,
    run_pipeline,
)
from fedhive.server.history import History
from fedhive.server.policy import RunPolicy, default_policy
from fedhive.server.stages import (
    RoundStage,
    build_pipeline,
    fold_fit_reply,
    unfoldable,
)
from fedhive.server.strategy.base import Strategy
from fedhive.transport.base import Replies, Transport

__all__ = [
    "Engine",
    "FitWorkflow",
    "RoundCallback",
    "RoundDriver",
    "SharedMailbox",
    "begin_fit_round",
    "default_fit_workflow",
    "end_fit_round",
    "failure_record",
    "fold_fit_reply",
    "run_pipeline",
]

log = logging.getLogger("fedhive")


class RoundCallback:
    """Receives the engine's events; override what you need (all default to nothing)."""

    def on_run_start(self, engine: Engine) -> None:
        """Called once before round 1 (after any resume)."""

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        """Called after every round with that round's history record."""

    def on_run_end(self, engine: Engine, history: History) -> None:
        """Called once when the run ends, normally or not."""


class FitWorkflow(Protocol):
    def __call__(self, driver: RoundDriver) -> None: ...


@dataclass
class RoundDriver:
    """What a fit workflow may do within one round.

    ``exchange`` sends one message per client and yields the replies in the order the
    tasks were given (deterministic folding), failures included as error replies.
    """

    engine: Engine
    server_round: int
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> Parameters:
        return self.engine.parameters

    @property
    def strategy(self) -> Strategy:
        return self.engine.strategy

    def exchange(
        self, message_type: str, contents: Sequence[tuple[ClientProxy, Any]]
    ) -> Iterator[Message]:
        return self.engine.exchange(self.server_round, message_type, contents)

    def update_parameters(self, parameters: Parameters) -> None:
        self.engine.set_parameters(parameters)


@dataclass(frozen=True)
class SharedMailbox:
    """Route an exchange's replies through a mailbox that also receives other replies.

    The asynchronous policy evaluates a published version while clients are still
    training: evaluation answers into the policy's own mailbox, and fit replies that
    arrive meanwhile go to ``other`` (which takes them off the transport's hands, so an
    upload slot held by a waiting fit reply can never starve the evaluation).
    """

    replies: Replies
    other: Callable[[Message], None]


class Engine:
    """Runs rounds of a strategy over a transport.

    ``seed`` makes sampling and per-task seeds reproducible; with ``ordered=True`` results
    are folded in sampled order whatever order they arrive in, so a seeded run gives the
    same history on any number of workers. ``checkpointer`` (if given) is called after
    every round with the engine, so state can be saved atomically; one with a
    ``release(engine, pending)`` method (:class:`~fedhive.server.checkpoint.Checkpointer`)
    is also called with each new model before it is evaluated (:meth:`finish_round`).

    ``policy`` runs the loop (:class:`~fedhive.server.policy.SyncRounds` by default, or
    the one an asynchronous strategy asks for: :func:`~fedhive.server.policy.default_policy`;
    :class:`~fedhive.server.asynchronous.BufferedAsync` for asynchronous aggregation).
    ``stages`` are the fit round's stages (:mod:`fedhive.server.stages`), checked here
    against the strategy's traits; ``fit_workflow`` (a callable taking a
    :class:`RoundDriver`) instead replaces the whole fit round. Times (deadlines,
    ``elapsed_s``) are measured on ``clock``.
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        transport: Transport,
        client_manager: ClientManager | None = None,
        config: ServerConfig | None = None,
        seed: int | None = None,
        run_id: int = 0,
        clock: Clock | None = None,
        callbacks: Sequence[RoundCallback] = (),
        fit_workflow: FitWorkflow | None = None,
        ordered: bool = True,
        checkpointer: Callable[[Engine], None] | None = None,
        policy: RunPolicy | None = None,
        stages: Sequence[RoundStage] | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigError(f"strategy must be a fedhive Strategy, got {type(strategy).__name__}")
        if policy is not None and not isinstance(policy, RunPolicy):
            raise ConfigError(
                f"policy must be a fedhive RunPolicy (SyncRounds, BufferedAsync), got "
                f"{type(policy).__name__}"
            )
        self.strategy = strategy
        self.transport = transport
        self.client_manager = client_manager or SimpleClientManager(seed=seed)
        self.config = config or ServerConfig()
        self.seed = seed
        self.run_id = run_id
        self.clock = clock or SystemClock()
        self.callbacks = list(callbacks)
        self.pipeline = build_pipeline(strategy, stages or (), fit_workflow)
        self.fit_workflow: FitWorkflow = fit_workflow or self.pipeline_round
        self.policy: RunPolicy = policy or default_policy(strategy)
        self.ordered = ordered
        self.checkpointer = checkpointer
        self.history = History()
        self.parameters = Parameters(arrays=[])
        self.model_version = 0
        self.current_round = 0
        self._started = False
        self._refused: list[str] = []
        self._wire: dict[str, list[int]] = {}  # client id -> [bytes up, bytes down] this round
        self._elapsed_before = 0.0
        self._run_start: float | None = None
        self._released: dict[str, Any] | None = None
        self.policy.check(self)

    # -- state -----------------------------------------------------------------------------

    def set_parameters(self, parameters: Parameters) -> None:
        """Install a new global model (bumps the model version)."""
        self.parameters = parameters
        self.model_version += 1

    def reseed_sampling(self, server_round: int, purpose: str) -> None:
        """Seed the client manager's sampling from (run seed, ``server_round``, ``purpose``)."""
        setter = getattr(self.client_manager, "set_sampling_seed", None)
        if setter is not None:
            setter(derive_seed(self.seed, server_round, "", f"sample-{purpose}"))

    # -- exchanges --------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        timeout = self.config.round_timeout
        return None if timeout is None else self.clock.now() + timeout

    def exchange(
        self,
        server_round: int,
        message_type: str,
        contents: Sequence[tuple[ClientProxy, Any]],
        *,
        route: SharedMailbox | None = None,
    ) -> Iterator[Message]:
        """Send one task per (client, content); yield a reply per task in task order.

        Late tasks become error replies once the round deadline passes. Replies for
        another run, round, task or client are refused (counted in the round record).
        With ``route``, the tasks answer into that (longer-lived) mailbox, and replies in
        it that are not for these tasks go to its ``other`` callback instead.
        """
        tasks = [
            Message.task(
                run_id=self.run_id,
                node_id=client.cid,
                server_round=server_round,
                model_version=self.model_version,
                message_type=message_type,
                content=content,
                seed=derive_seed(self.seed, server_round, client.cid, message_type),
            )
            for client, content in contents
        ]
        return self._collect(tasks, route)

    def _collect(self, tasks: list[Message], route: SharedMailbox | None) -> Iterator[Message]:
        pending = {task.metadata.message_id: task for task in tasks}
        replies = Replies(self.clock) if route is None else route.replies
        deadline = self._deadline()
        self.transport.send(tasks, replies)
        self.count_sent(tasks)
        arriving = self._receive(pending, replies, deadline, route)
        try:
            if not self.ordered:
                yield from arriving
                return
            # Reorder buffer: its size is bounded by how far ahead the transport runs.
            buffered: dict[str, Message] = {}
            order = [task.metadata.message_id for task in tasks]
            next_index = 0
            for reply in arriving:
                buffered[reply.metadata.reply_to] = reply
                del reply
                while next_index < len(order) and order[next_index] in buffered:
                    yield buffered.pop(order[next_index])
                    next_index += 1
        finally:
            if route is None:
                replies.cancel()

    def _receive(
        self,
        pending: dict[str, Message],
        replies: Replies,
        deadline: float | None,
        route: SharedMailbox | None = None,
    ) -> Iterator[Message]:
        """Accepted replies as they arrive; then a timeout error for each task left.

        No reference to a reply outlives its turn: while the next one is awaited, the
        previous one (perhaps a whole uploaded model) can already be freed.
        """
        while pending:
            reply = replies.get(deadline)
            if reply is None:
                break
            if route is not None and reply.metadata.reply_to not in pending:
                route.other(reply)
                del reply
                continue
            accepted = self.accept_reply(reply, pending)
            del reply
            if accepted is not None:
                yield accepted
            del accepted
        for task in list(pending.values()):
            yield task.error_reply(
                f"no reply within the round timeout of {self.config.round_timeout} s"
            )
        pending.clear()

    def accept_reply(self, reply: Message, pending: dict[str, Message]) -> Message | None:
        """The reply if it answers a task in ``pending`` (removed from it) of this run,
        round, node and type; else ``None``, and the refusal is kept for the round record."""
        meta = reply.metadata
        task = pending.get(meta.reply_to)
        problem = None
        if meta.run_id != self.run_id:
            problem = f"reply for run {meta.run_id}, this is run {self.run_id}"
        elif task is None:
            problem = f"reply to unknown or already answered task {meta.reply_to!r}"
        elif meta.server_round != task.metadata.server_round:
            problem = f"reply for round {meta.server_round} in round {task.metadata.server_round}"
        elif meta.node_id != task.metadata.node_id:
            problem = f"reply from {meta.node_id!r} to a task for {task.metadata.node_id!r}"
        elif meta.message_type != task.metadata.message_type:
            problem = f"reply of type {meta.message_type!r} to a {task.metadata.message_type!r}"
        if problem is not None:
            log.warning("refused a reply: %s", problem)
            self._refused.append(problem)
            return None
        del pending[meta.reply_to]
        self._count_wire(reply, 0)
        return reply

    def count_sent(self, tasks: list[Message]) -> None:
        """Add the bytes of ``tasks`` (just sent) to this round's download count."""
        for task in tasks:
            self._count_wire(task, 1)

    def _count_wire(self, message: Message, direction: int) -> None:
        """Add ``message``'s bytes on the wire to this round's count (0 up, 1 down)."""
        counts = self._wire.setdefault(message.metadata.node_id, [0, 0])
        counts[direction] += self.transport.wire_bytes(message)

    # -- the run ------------------------------------------------------------------------------

    def initialize(self) -> None:
        """Get the initial model: from the strategy, else from one client (as Flower does)."""
        params = self.strategy.initialize_parameters(self.client_manager)
        if params is None:
            params = self._parameters_from_a_client()
        self.parameters = params
        self.model_version = 0
        central = self.strategy.evaluate(0, self.parameters)
        if central is not None:
            loss, metrics = central
            record = {"round": 0, "elapsed_s": 0.0, "centralized": {"loss": loss, **metrics}}
            self.history.add_round(record)

    def _parameters_from_a_client(self) -> Parameters:
        self.reseed_sampling(0, "init")
        clients = self.client_manager.sample(1)
        if not clients:
            raise ConfigError("no initial_parameters and no client available to provide them")
        self._refused = []
        (reply,) = self.exchange(
            0, MessageType.GET_PARAMETERS, [(clients[0], GetParametersIns({}))]
        )
        if reply.error is not None or not isinstance(reply.content, GetParametersRes):
            raise ClientFailure(clients[0].cid, 0, MessageType.GET_PARAMETERS, str(reply.error))
        return reply.content.parameters

    def run(self, num_rounds: int | None = None) -> History:
        """Run the policy until ``num_rounds`` (default ``config.num_rounds``) model
        versions are published; return the history."""
        if not self._started:
            self.initialize()
            self._started = True
        until = self.config.num_rounds if num_rounds is None else num_rounds
        self._run_start = self.clock.now() - self._elapsed_before
        self.history.config.setdefault("policy", self.policy.name)
        for cb in self.callbacks:
            cb.on_run_start(self)
        try:
            if self._released is not None:  # resumed after a release, before its evaluation
                pending, self._released = self._released, None
                self._refused = list(pending.get("refused", []))
                self._wire = {cid: list(c) for cid, c in pending.get("wire", {}).items()}
                self._complete_round(pending["record"])
            with gc_frozen():
                self.policy.drive(self, until)
        finally:
            for cb in self.callbacks:
                cb.on_run_end(self, self.history)
        return self.history

    def resume_at(self, elapsed_s: float) -> None:
        """Mark the engine as resumed (from a checkpoint) after ``elapsed_s`` seconds. A
        fresh virtual clock (still before that time) moves on to it, so simulated time
        (arrivals, availability windows, deadlines) goes on from where it was, to the
        last bit."""
        self._elapsed_before = elapsed_s
        self._started = True
        if isinstance(self.clock, VirtualClock) and self.clock.now() < elapsed_s:
            self.clock.advance(elapsed_s - self.clock.now())

    def elapsed(self) -> float:
        """Seconds on the engine's clock since the run began (across resumes)."""
        if self._run_start is None:
            return self._elapsed_before
        return self.clock.now() - self._run_start

    def run_round(self, server_round: int, start: float | None = None) -> dict[str, Any]:
        """One synchronous round: the fit round (workflow or stage pipeline), then
        :meth:`finish_round`. ``start`` is accepted for compatibility and unused."""
        self._refused = []
        driver = RoundDriver(self, server_round, {"round": server_round})
        self.fit_workflow(driver)
        return self.finish_round(driver.record)

    def pipeline_round(self, driver: RoundDriver) -> None:
        """The fit round of the stage pipeline (the default fit workflow)."""
        run_pipeline(driver, self.pipeline)

    def finish_round(
        self,
        record: dict[str, Any],
        client_manager: ClientManager | None = None,
        route: SharedMailbox | None = None,
    ) -> dict[str, Any]:
        """Finish model version ``record["round"]``: release it, then centralized and
        federated evaluation (sampling from ``client_manager``, default the engine's;
        answering into ``route``'s mailbox if given), refusals, the model version and
        time; then history, checkpoint and callbacks. Every policy ends each version here.

        The release comes first and is durable: the new model, the strategy's state (a
        privacy ledger that has charged this version) and the fit record are saved
        (``checkpointer.release``) before evaluation lets anything outside the server see
        the model. A server killed after that point resumes with this version released
        and charged once, and only evaluates it again; killed before, it never let the
        model out, and runs the round again."""
        server_round = int(record["round"])
        self.current_round = server_round
        release = getattr(self.checkpointer, "release", None)
        if callable(release):
            pending = {"record": record, "refused": list(self._refused), "wire": self._wire}
            release(self, pending)
        return self._complete_round(record, client_manager, route)

    def resume_released(self, pending: dict[str, Any]) -> None:
        """Resume a version that was released (and charged) but not evaluated: ``run``
        evaluates it first (``pending`` is what :meth:`finish_round` saved)."""
        self._released = pending
        self._started = True

    def _complete_round(
        self,
        record: dict[str, Any],
        client_manager: ClientManager | None = None,
        route: SharedMailbox | None = None,
    ) -> dict[str, Any]:
        server_round = int(record["round"])
        central = self.strategy.evaluate(server_round, self.parameters)
        if central is not None:
            record["centralized"] = {"loss": central[0], **central[1]}
        record["distributed"] = self._evaluate_round(server_round, client_manager, route)
        if self._refused:
            record["refused"] = list(self._refused)
        record["bytes_up"] = sum(up for up, _ in self._wire.values())
        record["bytes_down"] = sum(down for _, down in self._wire.values())
        record["bytes_clients"] = ClientBytes(self._wire)  # packed: ~25 B per client
        self._wire = {}
        record["model_version"] = self.model_version
        record["elapsed_s"] = self.elapsed()
        if isinstance(self.clock, VirtualClock):  # simulated time: part of the results
            record["virtual_time_s"] = record["elapsed_s"]
        self._elapsed_before = record["elapsed_s"]
        self.history.add_round(record)
        if self.checkpointer is not None:
            self.checkpointer(self)
        for cb in self.callbacks:
            cb.on_round_end(self, record)
        self._refused = []
        return record

    def _evaluate_round(
        self,
        server_round: int,
        client_manager: ClientManager | None = None,
        route: SharedMailbox | None = None,
    ) -> dict[str, Any] | None:
        self.reseed_sampling(server_round, "evaluate")
        instructions = self.strategy.configure_evaluate(
            server_round, self.parameters, client_manager or self.client_manager
        )
        if not instructions:
            return None
        aggregator = self.strategy.evaluate_aggregator(server_round, self.parameters)
        clients: list[dict[str, Any]] = []
        failures: list[ClientFailure] = []
        for reply in self.exchange(server_round, MessageType.EVALUATE, instructions, route=route):
            cid = reply.metadata.node_id
            res = reply.content
            if reply.error is None and not isinstance(res, EvaluateRes):
                reply = reply.error_reply("evaluate reply is not an EvaluateRes")
            if reply.error is not None:
                failure = ClientFailure(cid, server_round, MessageType.EVALUATE, reply.error)
                failures.append(failure)
                aggregator.add_failure(failure)
                continue
            try:
                aggregator.add(ClientProxy(cid), res)
            except Exception as exc:  # one client's reply never ends the run
                failure = unfoldable(cid, server_round, MessageType.EVALUATE, exc)
                failures.append(failure)
                aggregator.add_failure(failure)
                continue
            clients.append(
                {
                    "client_id": cid,
                    "loss": res.loss,
                    "num_examples": res.num_examples,
                    "metrics": dict(res.metrics),
                }
            )
        out: dict[str, Any] = {"num_results": len(clients), "clients": clients}
        out["failures"] = [failure_record(f) for f in failures]
        if len(clients) < max(1, self.config.min_evaluate_results):
            out["note"] = (
                f"{len(clients)} evaluation results, fewer than the minimum "
                f"{self.config.min_evaluate_results}; no distributed loss this round"
            )
            out["loss"], out["metrics"] = None, {}
            return out
        loss, metrics = aggregator.finalize()
        out["loss"], out["metrics"] = loss, dict(metrics)
        return out
