"""Buffered asynchronous aggregation: fold every K results, no round barrier.

A run policy (:mod:`fedhive.server.policy`): the engine keeps ``concurrency`` clients
training at all times. Each result is folded into the current aggregator as soon as it
arrives; after ``buffer_size`` results the aggregate becomes the next model version and a
new aggregator starts. A client that finishes is replaced at once by a newly sampled
idle client, which trains on the newest model. Every result's *staleness* (model
versions published between its dispatch and its arrival) is recorded. This is the shape
of FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022); staleness weighting and server learning rates belong to strategies built
on it.

Each published version is finished like a synchronous round
(:meth:`~fedhive.server.engine.Engine.finish_round`): centralized evaluation, federated
evaluation on idle clients, the history record, the checkpoint and the callbacks. The
policy's dispatch counter is checkpointed, so a resumed run continues the version and
seed sequence; tasks in flight at a crash are lost and re-dispatched, as in a
deployment. Results fold in arrival order: with the real clock runs are not
bit-reproducible; on a :class:`~fedhive.common.clock.VirtualClock` with simulated
latencies the arrival order, and so the run, is fixed by the seed.

Example::

    from fedhive.server.asynchronous import BufferedAsync

    history = start_simulation(
        client_fn=..., num_clients=100, config=ServerConfig(num_rounds=50),
        policy=BufferedAsync(buffer_size=10, concurrency=20),
    )  # 50 model versions of 10 results each
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedhive.common.errors import CheckpointError, ClientFailure, ConfigError
from fedhive.common.message import Message, MessageType, derive_seed
from fedhive.server.client_manager import ClientManager, ClientProxy, Criterion, Excluding
from fedhive.server.engine import Engine, RoundDriver, SharedMailbox, failure_record
from fedhive.server.history import History
from fedhive.server.policy import RunPolicy
from fedhive.server.stages import PlainExchange
from fedhive.server.strategy.base import Aggregator
from fedhive.transport.base import Replies

__all__ = ["BufferedAsync"]


class _IdleClients:
    """The engine's clients minus those training now, as a client manager.

    With ``slots`` set, ``sample`` returns up to that many idle clients whatever size the
    strategy asks for: ``configure_fit`` fills the freed slots, with its own configs.
    Without, it returns what the strategy asks for, or every idle client when fewer are
    idle (federated evaluation of a published version runs on idle clients only, so a
    straggler never holds it up).
    """

    def __init__(self, manager: ClientManager, busy: set[str], slots: int | None = None) -> None:
        self.manager = manager
        self.busy = busy
        self.slots = slots

    def _num_idle(self) -> int:
        # O(1) per dispatch. A busy client that disconnected is still counted until its
        # task fails (at once, on disconnect); a sample drawn meanwhile may come back
        # empty, and the slot is filled at the next reply.
        return max(0, self.manager.num_available() - len(self.busy))

    def num_available(self) -> int:
        idle = self._num_idle()
        return idle if self.slots is None else min(idle, self.slots)

    def all(self) -> dict[str, ClientProxy]:
        return {cid: proxy for cid, proxy in self.manager.all().items() if cid not in self.busy}

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        idle = self._num_idle()
        wanted = num_clients if self.slots is None else self.slots
        # min_num_clients counts connected clients, busy ones included; the policy
        # waited for those already, so only the idle ones limit the sample.
        # Excluding without an inner criterion is sampled in O(k) draws by the managers
        # here (no client is listed); a custom manager just calls its select.
        return self.manager.sample(min(wanted, idle), criterion=Excluding(self.busy, criterion))


@dataclass
class BufferedAsync(RunPolicy):
    """Publish a model every ``buffer_size`` results, ``concurrency`` clients training.

    ``max_staleness`` (optional) refuses results older than that many versions. The
    run's length is ``config.num_rounds`` model versions. A task has
    ``config.round_timeout`` seconds (if set) before it becomes a timeout failure and its
    slot is given to another client. Memory: one aggregator (O(model) for FedAvg) plus
    the replies in flight.
    """

    name: ClassVar[str] = "buffered-async"

    buffer_size: int
    concurrency: int
    max_staleness: int | None = None
    checkpoint_every: int | None = None
    dispatched: int = field(default=0, init=False, repr=False, compare=False)
    #: Folded results per client over the run (each version records the shares).
    contributions: dict[str, int] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    #: The sum of ``contributions`` (kept, so publishing costs O(buffer), not O(clients)).
    folded: int = field(default=0, init=False, repr=False, compare=False)
    #: The open buffer's record, restored from a checkpoint taken mid-buffer.
    restored: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("buffer_size", "concurrency"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an int >= 1, got {value!r}")
        limit = self.max_staleness
        bad = isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        if limit is not None and bad:
            raise ConfigError(f"max_staleness must be None or an int >= 0, got {limit!r}")
        every = self.checkpoint_every
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ConfigError(f"checkpoint_every must be None or an int >= 1, got {every!r}")

    def check(self, engine: Engine) -> None:
        if engine.fit_workflow != engine.pipeline_round:
            raise ConfigError(
                "asynchronous aggregation folds each reply as it arrives; a custom "
                "fit_workflow is a synchronous round and cannot be used with it"
            )
        exchange = engine.pipeline.exchange
        if not isinstance(exchange, PlainExchange):
            raise ConfigError(
                f"asynchronous aggregation sends one fit task per client; the exchange stage "
                f"{exchange.name!r} needs a synchronous round (use the default policy)"
            )
        for stage in engine.pipeline.stages[1:]:
            if stage.asynchronous_reason:
                raise ConfigError(
                    f"asynchronous aggregation cannot run the stage {stage.name!r}: "
                    f"{stage.asynchronous_reason}"
                )
        if self.checkpoint_every is not None and not _checkpoints_open_buffer(engine.strategy):
            raise ConfigError(
                f"checkpoint_every saves the open buffer mid-version, which "
                f"{type(engine.strategy).__name__} does not keep in its state; use FedBuff, "
                "or checkpoint per published version only (checkpoint_every = None)"
            )

    def run(self, engine: Engine, num_updates: int) -> History:
        """Run ``engine`` with this policy until ``num_updates`` versions are published."""
        self.check(engine)
        engine.policy = self
        return engine.run(num_updates)

    def drive(self, engine: Engine, until: int) -> None:
        if engine.current_round >= until:
            return
        state = _AsyncRun(self, engine)
        try:
            while engine.current_round < until:
                state.step()
        finally:
            state.replies.cancel()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "dispatched": self.dispatched,
            "contributions": dict(self.contributions),
        }
        if self.restored is not None:
            state["open"] = self.restored
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        value = state.get("dispatched")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"a buffered-async checkpoint needs 'dispatched', got {state!r}")
        counts = state.get("contributions", {})
        if not isinstance(counts, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in counts.values()
        ):
            raise CheckpointError(f"a buffered-async checkpoint has bad contributions: {counts!r}")
        opened = state.get("open")
        if opened is not None and not isinstance(opened, dict):
            raise CheckpointError(f"a buffered-async checkpoint has a bad open buffer: {opened!r}")
        self.dispatched = value
        self.contributions = {str(k): int(n) for k, n in counts.items()}
        self.folded = sum(self.contributions.values())
        self.restored = opened


def _checkpoints_open_buffer(strategy: object) -> bool:
    from fedhive.server.strategy.asyncbase import AsynchronousStrategy

    return isinstance(strategy, AsynchronousStrategy) and strategy.checkpoints_open_buffer


class _AsyncRun:
    """One stretch of an asynchronous run (from start or resume to the end)."""

    def __init__(self, policy: BufferedAsync, engine: Engine) -> None:
        self.policy = policy
        self.engine = engine
        self.replies = Replies(engine.clock)
        self.pending: dict[str, Message] = {}
        self.deadlines: dict[str, float] = {}
        self.busy: set[str] = set()
        self.stash: list[Message] = []  # fit replies that came during an evaluation
        self.failed_in_a_row = 0
        self.freed = 0  # slots freed at this instant, refilled together
        self._new_buffer()
        self._dispatch(policy.concurrency)

    def _new_buffer(self) -> None:
        engine = self.engine
        rnd = engine.current_round + 1
        record: dict[str, Any] = {"round": rnd, "staleness": []}
        self.fit: dict[str, Any] = {"num_results": 0, "metrics": {}}
        self.counts: dict[str, int] = {}
        opened, self.policy.restored = self.policy.restored, None
        if opened is not None and opened.get("round") == rnd:
            # resumed mid-buffer: the strategy restored its sums, this is their record
            record["staleness"] = list(opened.get("staleness", []))
            self.fit["num_results"] = int(opened.get("num_results", 0))
            self.counts = dict(opened.get("counts", {}))
        self.driver = RoundDriver(engine, rnd, record)
        self.driver.record["fit"] = self.fit
        self.aggregator: Aggregator
        self.aggregator, self.sink = engine.pipeline.prepare(self.driver, self.fit)

    def _dispatch(self, count: int) -> None:
        engine = self.engine
        self.policy.dispatched += 1
        dispatch = self.policy.dispatched
        engine.reseed_sampling(dispatch, "async-sample")
        manager = engine.client_manager
        wait_for = getattr(manager, "wait_for", None)  # Flower's ClientManager has it
        if callable(wait_for) and manager.num_available() - len(self.busy) < count:
            # deployment: clients connect over time (simulation: wait_timeout is 0)
            wait_for(len(self.busy) + count, getattr(manager, "wait_timeout", 0.0))
        view = _IdleClients(manager, self.busy, slots=count)
        instructions = engine.strategy.configure_fit(
            engine.model_version + 1, engine.parameters, view
        )
        for stage in engine.pipeline.stages[1:]:  # a codec asks for encoded replies
            stage.in_flight(self.busy)
            instructions = stage.instruct(self.driver, instructions)
        tasks = []
        timeout = engine.config.round_timeout
        for client, ins in instructions:
            if client.cid in self.busy:
                continue  # a strategy that ignored the view; never two tasks at one client
            task = Message.task(
                run_id=engine.run_id,
                node_id=client.cid,
                server_round=engine.model_version,
                model_version=engine.model_version,
                message_type=MessageType.FIT,
                content=ins,
                seed=derive_seed(engine.seed, dispatch, client.cid, "async-fit"),
            )
            self.pending[task.metadata.message_id] = task
            if timeout is not None:
                self.deadlines[task.metadata.message_id] = engine.clock.now() + timeout
            self.busy.add(client.cid)
            tasks.append(task)
        if tasks:
            engine.transport.send(tasks, self.replies)
            engine.count_sent(tasks)

    def step(self) -> None:
        if not self.pending:
            self._dispatch(self.policy.concurrency)
            self.freed = 0
        if not self.pending:
            raise ConfigError("no client is available to train; cannot make progress")
        now = self.engine.clock.now()
        deadline = min(self.deadlines.values()) if self.deadlines else None
        if deadline is not None and deadline <= now:
            self._expire()  # also while fast clients keep the mailbox full
            return
        reply: Message | None
        if self.stash:
            reply = self.stash.pop(0)
        elif self.freed:
            # Every reply that arrives at this instant is folded (and a full buffer
            # published) before the freed slots are refilled, so they train on the
            # newest model: with equal latencies and buffer_size == concurrency this is
            # synchronous FedAvg.
            # (on the virtual clock the announced arrivals tell, without a wait)
            reply = self.replies.get(now) if self.replies.may_arrive_by(now) else None
            if reply is None:
                self._dispatch(self.freed)
                self.freed = 0
                return
        else:
            reply = self.replies.get(deadline)
            if reply is None:
                self._expire()
                return
        self._take(reply)

    def _take(self, reply: Message) -> None:
        task = self.pending.get(reply.metadata.reply_to)
        accepted = self.engine.accept_reply(reply, self.pending)
        del reply
        if accepted is None or task is None:
            return
        self.deadlines.pop(accepted.metadata.reply_to, None)
        self.busy.discard(accepted.metadata.node_id)
        # staleness from the task the server sent, never from what the client says
        self._fold(accepted, task.metadata.model_version)
        del accepted
        # Folded: free what the transport holds for it (an upload slot) before any
        # evaluation exchange waits on another mailbox.
        self.replies.done()
        if self.fit["num_results"] >= self.policy.buffer_size:
            self._publish()
        else:
            self._checkpoint_open_buffer()
        self.freed += 1

    def _expire(self) -> None:
        now = self.engine.clock.now()
        late = [mid for mid, at in self.deadlines.items() if at <= now]
        for mid in late:
            task = self.pending.pop(mid)
            del self.deadlines[mid]
            self.busy.discard(task.metadata.node_id)
            timeout = self.engine.config.round_timeout
            self._fold(
                task.error_reply(f"no reply within the round timeout of {timeout} s"),
                task.metadata.model_version,
            )
        self.freed += len(late)

    def _checkpoint_open_buffer(self) -> None:
        every = self.policy.checkpoint_every
        engine = self.engine
        if every is None or engine.checkpointer is None or self.fit["num_results"] % every:
            return
        self.policy.restored = {
            "round": self.driver.server_round,
            "num_results": self.fit["num_results"],
            "staleness": list(self.driver.record["staleness"]),
            "counts": dict(self.counts),
        }
        try:
            engine.checkpointer(engine)
        finally:
            self.policy.restored = None

    def _fold(self, reply: Message, version: int) -> None:
        staleness = self.engine.model_version - version
        limit = self.policy.max_staleness
        if limit is not None and staleness > limit and reply.error is None:
            reply = reply.error_reply(f"staleness {staleness} exceeds max_staleness {limit}")
        cid = reply.metadata.node_id
        if self.sink.add_reply(reply):
            self.failed_in_a_row = 0
            self.driver.record["staleness"].append({"client_id": cid, "staleness": staleness})
            self.counts[cid] = self.counts.get(cid, 0) + 1
            return
        self.failed_in_a_row += 1
        limit_failures = 10 * max(self.policy.buffer_size, self.policy.concurrency)
        if self.failed_in_a_row >= limit_failures:
            last = self.sink.failures[-1]
            raise ClientFailure(
                last.client_id,
                self.driver.server_round,
                MessageType.FIT,
                f"the last {self.failed_in_a_row} results all failed (last: {last.reason}); "
                "the asynchronous run cannot make progress",
            )

    def _publish(self) -> None:
        engine, record = self.engine, self.driver.record
        params, metrics = self.aggregator.finalize()
        self.fit["metrics"] = dict(metrics)
        self.fit["num_failures"] = len(self.sink.failures)
        self.fit["updated"] = params is not None
        record["failures"] = [failure_record(f) for f in self.sink.failures]
        record["contributions"] = self._contributions()
        if params is not None:
            engine.set_parameters(params)
        else:
            self.fit["note"] = "the strategy returned no parameters; the model is unchanged"
        engine.finish_round(
            record,
            client_manager=_IdleClients(engine.client_manager, self.busy),
            route=SharedMailbox(self.replies, self.stash.append),
        )
        self._new_buffer()

    def _contributions(self) -> list[dict[str, Any]]:
        """Each client folded into this version: its results here, and its share of all
        results folded so far in the run (fast clients contribute more often). Memory:
        one count per client that contributed in the run."""
        total = self.policy.contributions
        for cid, count in self.counts.items():
            total[cid] = total.get(cid, 0) + count
        self.policy.folded += sum(self.counts.values())
        folded = self.policy.folded
        return [
            {"client_id": cid, "results": count, "share": total[cid] / folded}
            for cid, count in sorted(self.counts.items())
        ]
