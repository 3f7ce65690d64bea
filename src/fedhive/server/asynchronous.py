"""Buffered asynchronous aggregation: fold every K results, no round barrier.

The engine keeps ``concurrency`` clients training at all times. Each result is folded
into the current aggregator as soon as it arrives; after ``buffer_size`` results the
aggregate becomes the next model version and a new aggregator starts. A client that
finishes is replaced at once by a newly sampled idle client, which trains on the newest
model. Every result's *staleness* (model versions published between its dispatch and
its arrival) is recorded. This is the shape of FedBuff (Nguyen et al., "Federated
Learning with Buffered Asynchronous Aggregation", AISTATS 2022); staleness weighting and
server learning rates belong to strategies built on it.

Results are folded in arrival order, so asynchronous runs are not bit-reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fedhive.common.errors import ConfigError
from fedhive.common.message import Message, MessageType, derive_seed
from fedhive.common.records import FitIns, parameters_to_ndarrays
from fedhive.server.client_manager import ClientProxy
from fedhive.server.engine import Engine, RoundDriver, _failure_dict, _fold_fit_reply
from fedhive.server.history import History
from fedhive.transport.base import Replies

__all__ = ["BufferedAsync"]


class _Idle:
    def __init__(self, busy: set[str]) -> None:
        self.busy = busy

    def select(self, client: ClientProxy) -> bool:
        return client.cid not in self.busy


@dataclass
class BufferedAsync:
    """Run ``engine`` asynchronously until ``num_updates`` model versions are published.

    ``buffer_size`` is K (results per new model), ``concurrency`` the number of clients
    training at once, ``max_staleness`` (optional) refuses results older than that.
    """

    buffer_size: int
    concurrency: int
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {self.buffer_size}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")

    def run(self, engine: Engine, num_updates: int) -> History:
        if not engine._started:
            engine.initialize()
            engine._started = True
        state = _AsyncRun(self, engine)
        try:
            while engine.current_round < num_updates:
                state.step()
        finally:
            state.replies.cancel()
        return engine.history


class _AsyncRun:
    def __init__(self, policy: BufferedAsync, engine: Engine) -> None:
        self.policy = policy
        self.engine = engine
        self.replies = Replies(engine.clock)
        self.pending: dict[str, Message] = {}
        self.busy: set[str] = set()
        self.dispatched = 0
        self.start = time.perf_counter()
        self._new_buffer()
        self._dispatch(policy.concurrency)

    def _new_buffer(self) -> None:
        rnd = self.engine.current_round + 1
        self.driver = RoundDriver(self.engine, rnd, {"round": rnd, "staleness": []})
        self.aggregator = self.engine.strategy.fit_aggregator(rnd, self.engine.parameters)
        self.reference = parameters_to_ndarrays(self.engine.parameters)
        self.folded = 0
        self.failures: list[dict[str, Any]] = []

    def _dispatch(self, count: int) -> None:
        engine = self.engine
        self.dispatched += 1
        engine._reseed_sampling(self.dispatched, "async-sample")
        count = min(count, engine.client_manager.num_available() - len(self.busy))
        clients = engine.client_manager.sample(count, criterion=_Idle(self.busy))
        tasks = []
        for client in clients:
            config = {}
            on_fit = getattr(engine.strategy, "on_fit_config_fn", None)
            if on_fit is not None:
                config = dict(on_fit(engine.model_version + 1))
            task = Message.task(
                run_id=engine.run_id,
                node_id=client.cid,
                server_round=engine.model_version,
                model_version=engine.model_version,
                message_type=MessageType.FIT,
                content=FitIns(engine.parameters, config),
                seed=derive_seed(engine.seed, self.dispatched, client.cid, "async-fit"),
            )
            self.pending[task.metadata.message_id] = task
            self.busy.add(client.cid)
            tasks.append(task)
        if tasks:
            engine.transport.send(tasks, self.replies)

    def step(self) -> None:
        if not self.pending:
            raise ConfigError("no client is available to train; cannot make progress")
        reply = self.replies.get(None)
        if reply is None:
            return
        accepted = self.engine._accept(reply, self.pending)
        if accepted is None:
            return
        self.busy.discard(accepted.metadata.node_id)
        self._fold(accepted)
        if self.folded >= self.policy.buffer_size:
            self._publish()
        self._dispatch(1)

    def _fold(self, reply: Message) -> None:
        staleness = self.engine.model_version - reply.metadata.model_version
        limit = self.policy.max_staleness
        if limit is not None and staleness > limit and reply.error is None:
            reply = reply.error_reply(f"staleness {staleness} exceeds max_staleness {limit}")
        failure = _fold_fit_reply(self.driver, reply, self.aggregator, self.reference)
        if failure is not None:
            self.failures.append(_failure_dict(failure))
            return
        self.folded += 1
        self.driver.record["staleness"].append(
            {"client_id": reply.metadata.node_id, "staleness": staleness}
        )

    def _publish(self) -> None:
        engine = self.engine
        params, metrics = self.aggregator.finalize()
        record = self.driver.record
        record["fit"] = {"num_results": self.folded, "metrics": dict(metrics)}
        record["failures"] = self.failures
        if params is not None:
            engine.set_parameters(params)
        central = engine.strategy.evaluate(self.driver.server_round, engine.parameters)
        if central is not None:
            record["centralized"] = {"loss": central[0], **central[1]}
        record["model_version"] = engine.model_version
        record["elapsed_s"] = time.perf_counter() - self.start
        engine.current_round = self.driver.server_round
        engine.history.add_round(record)
        for cb in engine.callbacks:
            cb.on_round_end(engine, record)
        self._new_buffer()
