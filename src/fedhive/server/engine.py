"""The round engine: the same loop for simulation and deployment.

One round is: sample -> configure -> dispatch -> stream results into the strategy's
aggregator -> finalize -> centralized and federated evaluation. The engine reaches
clients only through a :class:`~fedhive.transport.base.Transport`, measures deadlines on
its own :class:`~fedhive.common.clock.Clock`, and checks that every reply belongs to this
run, round and task before anything is folded.

Rounds are run by a *fit workflow*; the default one is Flower's single exchange. A
workflow gets a :class:`RoundDriver`, which can run any number of exchanges of any
message type in a round (secure aggregation's key agreement, share collection, ...).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedhive.common.clock import Clock, SystemClock
from fedhive.common.errors import ClientFailure, ConfigError, InvalidUpdate
from fedhive.common.message import Message, MessageType, derive_seed
from fedhive.common.records import (
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from fedhive.server.client_manager import ClientManager, ClientProxy, SimpleClientManager
from fedhive.server.config import ServerConfig
from fedhive.server.history import History
from fedhive.server.strategy.aggregate import check_update
from fedhive.server.strategy.base import Strategy
from fedhive.transport.base import Replies, Transport

__all__ = ["Engine", "RoundCallback", "RoundDriver", "FitWorkflow", "default_fit_workflow"]

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


class Engine:
    """Runs rounds of a strategy over a transport.

    ``seed`` makes sampling and per-task seeds reproducible; with ``ordered=True`` results
    are folded in sampled order whatever order they arrive in, so a seeded run gives the
    same history on any number of workers. ``checkpointer`` (if given) is called after
    every round with the engine, so state can be saved atomically.
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
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigError(f"strategy must be a fedhive Strategy, got {type(strategy).__name__}")
        self.strategy = strategy
        self.transport = transport
        self.client_manager = client_manager or SimpleClientManager(seed=seed)
        self.config = config or ServerConfig()
        self.seed = seed
        self.run_id = run_id
        self.clock = clock or SystemClock()
        self.callbacks = list(callbacks)
        self.fit_workflow: FitWorkflow = fit_workflow or default_fit_workflow
        self.ordered = ordered
        self.checkpointer = checkpointer
        self.history = History()
        self.parameters = Parameters(arrays=[])
        self.model_version = 0
        self.current_round = 0
        self._started = False
        self._refused: list[str] = []
        self._elapsed_before = 0.0

    # -- state -----------------------------------------------------------------------------

    def set_parameters(self, parameters: Parameters) -> None:
        """Install a new global model (bumps the model version)."""
        self.parameters = parameters
        self.model_version += 1

    def _reseed_sampling(self, server_round: int, purpose: str) -> None:
        setter = getattr(self.client_manager, "set_sampling_seed", None)
        if setter is not None:
            setter(derive_seed(self.seed, server_round, "", f"sample-{purpose}"))

    # -- exchanges --------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        timeout = self.config.round_timeout
        return None if timeout is None else self.clock.now() + timeout

    def exchange(
        self, server_round: int, message_type: str, contents: Sequence[tuple[ClientProxy, Any]]
    ) -> Iterator[Message]:
        """Send one task per (client, content); yield a reply per task in task order.

        Late tasks become error replies once the round deadline passes. Replies for
        another run, round, task or client are refused (counted in the round record).
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
        return self._collect(tasks)

    def _collect(self, tasks: list[Message]) -> Iterator[Message]:
        pending = {task.metadata.message_id: task for task in tasks}
        replies = Replies(self.clock)
        deadline = self._deadline()
        self.transport.send(tasks, replies)
        arriving = self._receive(pending, replies, deadline)
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
            replies.cancel()

    def _receive(
        self, pending: dict[str, Message], replies: Replies, deadline: float | None
    ) -> Iterator[Message]:
        """Accepted replies as they arrive; then a timeout error for each task left.

        No reference to a reply outlives its turn: while the next one is awaited, the
        previous one (perhaps a whole uploaded model) can already be freed.
        """
        while pending:
            reply = replies.get(deadline)
            if reply is None:
                break
            accepted = self._accept(reply, pending)
            del reply
            if accepted is not None:
                yield accepted
            del accepted
        for task in list(pending.values()):
            yield task.error_reply(
                f"no reply within the round timeout of {self.config.round_timeout} s"
            )
        pending.clear()

    def _accept(self, reply: Message, pending: dict[str, Message]) -> Message | None:
        """The reply if it answers a pending task of this run and round, else ``None``."""
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
        return reply

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
        self._reseed_sampling(0, "init")
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

    def run(self) -> History:
        """Run the remaining rounds and return the history."""
        if not self._started:
            self.initialize()
            self._started = True
        start = time.perf_counter() - self._elapsed_before
        for cb in self.callbacks:
            cb.on_run_start(self)
        try:
            while self.current_round < self.config.num_rounds:
                self.run_round(self.current_round + 1, start)
        finally:
            for cb in self.callbacks:
                cb.on_run_end(self, self.history)
        return self.history

    def run_round(self, server_round: int, start: float) -> dict[str, Any]:
        self._refused = []
        driver = RoundDriver(self, server_round, {"round": server_round})
        self.fit_workflow(driver)
        record = driver.record
        central = self.strategy.evaluate(server_round, self.parameters)
        if central is not None:
            record["centralized"] = {"loss": central[0], **central[1]}
        record["distributed"] = self._evaluate_round(server_round)
        if self._refused:
            record["refused"] = list(self._refused)
        record["model_version"] = self.model_version
        record["elapsed_s"] = time.perf_counter() - start
        self._elapsed_before = record["elapsed_s"]
        self.current_round = server_round
        self.history.add_round(record)
        if self.checkpointer is not None:
            self.checkpointer(self)
        for cb in self.callbacks:
            cb.on_round_end(self, record)
        return record

    def _evaluate_round(self, server_round: int) -> dict[str, Any] | None:
        self._reseed_sampling(server_round, "evaluate")
        instructions = self.strategy.configure_evaluate(
            server_round, self.parameters, self.client_manager
        )
        if not instructions:
            return None
        aggregator = self.strategy.evaluate_aggregator(server_round, self.parameters)
        clients: list[dict[str, Any]] = []
        failures: list[ClientFailure] = []
        for reply in self.exchange(server_round, MessageType.EVALUATE, instructions):
            cid = reply.metadata.node_id
            res = reply.content
            if reply.error is None and not isinstance(res, EvaluateRes):
                reply = reply.error_reply("evaluate reply is not an EvaluateRes")
            if reply.error is not None:
                failure = ClientFailure(cid, server_round, MessageType.EVALUATE, reply.error)
                failures.append(failure)
                aggregator.add_failure(failure)
                continue
            aggregator.add(ClientProxy(cid), res)
            clients.append(
                {
                    "client_id": cid,
                    "loss": res.loss,
                    "num_examples": res.num_examples,
                    "metrics": dict(res.metrics),
                }
            )
        out: dict[str, Any] = {"num_results": len(clients), "clients": clients}
        out["failures"] = [_failure_dict(f) for f in failures]
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


def _failure_dict(failure: ClientFailure) -> dict[str, Any]:
    return {
        "client_id": failure.client_id,
        "round": failure.server_round,
        "stage": failure.stage,
        "reason": failure.reason,
    }


def _fold_fit_reply(
    driver: RoundDriver, reply: Message, aggregator: Any, reference: list[Any]
) -> ClientFailure | None:
    """Validate one fit reply and fold it; the failure if it was refused."""
    rnd = driver.server_round
    cid = reply.metadata.node_id
    if reply.error is not None:
        return ClientFailure(cid, rnd, MessageType.FIT, reply.error)
    res = reply.content
    if not isinstance(res, FitRes):
        return InvalidUpdate(cid, rnd, MessageType.FIT, "fit reply is not a FitRes")
    try:
        if getattr(driver.strategy, "validate_fit_results", True):
            check_update(
                parameters_to_ndarrays(res.parameters),
                reference,
                client_id=cid,
                server_round=rnd,
            )
        aggregator.add(ClientProxy(cid), res)
    except InvalidUpdate as exc:
        return exc.with_traceback(None)  # its frames would keep the refused upload alive
    return None


def begin_fit_round(
    driver: RoundDriver,
) -> tuple[list[tuple[ClientProxy, FitIns]], dict[str, Any]] | None:
    """Flower's start of a fit round: the strategy's instructions and the round's ``fit``
    record, or ``None`` (noted in the record) when ``configure_fit`` selected no client."""
    engine, rnd = driver.engine, driver.server_round
    engine._reseed_sampling(rnd, "fit")
    instructions = engine.strategy.configure_fit(rnd, engine.parameters, engine.client_manager)
    fit: dict[str, Any] = {"num_clients": len(instructions), "num_results": 0, "metrics": {}}
    driver.record["fit"] = fit
    if not instructions:
        fit["updated"] = False
        fit["note"] = "configure_fit selected no clients; the model is unchanged"
        return None
    return list(instructions), fit


def end_fit_round(
    driver: RoundDriver,
    fit: dict[str, Any],
    finalize: Callable[[], tuple[Parameters | None, dict[str, Scalar]]],
    results: str = "successful fit results",
) -> None:
    """Flower's end of a fit round with ``fit["num_results"]`` results: too few keep the
    model; otherwise ``finalize()`` (the strategy's aggregate) gives the next one."""
    minimum = driver.engine.config.min_fit_results
    if fit["num_results"] < max(1, minimum):
        fit["updated"] = False
        fit["note"] = (
            f"{fit['num_results']} {results}, fewer than the minimum {minimum}; "
            "the model is unchanged"
        )
        return
    params, metrics = finalize()
    fit["metrics"] = dict(metrics)
    fit["updated"] = params is not None
    if params is None:
        fit["note"] = "the strategy returned no parameters; the model is unchanged"
        return
    driver.update_parameters(params)


def default_fit_workflow(driver: RoundDriver) -> None:
    """Flower's fit round: one exchange, results streamed into the strategy's aggregator."""
    begun = begin_fit_round(driver)
    if begun is None:
        return
    contents, fit = begun
    engine, rnd = driver.engine, driver.server_round
    aggregator = engine.strategy.fit_aggregator(rnd, engine.parameters)
    reference = parameters_to_ndarrays(engine.parameters)
    failures: list[ClientFailure] = []
    for reply in driver.exchange(MessageType.FIT, contents):
        failure = _fold_fit_reply(driver, reply, aggregator, reference)
        del reply  # folded: free the upload before the next one is awaited
        if failure is None:
            fit["num_results"] += 1
        else:
            failures.append(failure)
            aggregator.add_failure(failure)
    driver.record["failures"] = [_failure_dict(f) for f in failures]
    fit["num_failures"] = len(failures)
    end_fit_round(driver, fit, aggregator.finalize)
