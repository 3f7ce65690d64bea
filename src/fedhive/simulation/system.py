"""Simulated device heterogeneity: how long each virtual client takes, and when it is there.

A :class:`SystemModel` gives every virtual client a compute speed (examples per second)
and a link bandwidth, drawn once per client from a distribution or read from a trace
file, and turns each task into a simulated duration::

    duration = (examples x epochs / speed  +  bytes down / down bandwidth
                + bytes up / up bandwidth) x jitter

``examples`` is the client's training set size (``num_examples``, default
``default_examples``), ``epochs`` the task's ``config["local_epochs"]``; the bytes are
the encoded lengths of the task's content (down) and of the reply its client computed
(up) (:func:`~fedhive.transport.base.content_length`; the message headers, whose ids
vary between runs, are left out), so a compressed model or update moves faster;
``jitter`` a per-task log-normal factor. The reply's length is known only once it is
computed: the transport announces the reply for when the upload starts
(:meth:`SystemModel.task_seconds`) and adds the upload then
(:meth:`SystemModel.upload_seconds`). A fit task is abandoned midway with probability
``dropout`` (its client answers with an error, without uploading, at a uniformly drawn
fraction of its computing and download time). Clients outside their availability
windows are not offered for sampling.

With ``start_simulation(system=...)`` the run uses the discrete-event
:class:`~fedhive.common.clock.VirtualClock`: nothing sleeps, an hour of simulated
stragglers takes the seconds the clients need to compute, and every draw comes from the
run seed and the task's own seed, so a seeded run, its simulated times included, is the
same on any number of workers.

Speed distributions (``latency``; the spread is ``sigma``), each a slowness factor ``m``
and ``speed / m`` examples per second:

- ``"lognormal"``: ``m = exp(N(0, sigma^2))`` (median 1);
- ``"pareto"``: ``m = 1 + Lomax(1 / sigma)`` (heavy tail; infinite mean for sigma >= 1);
- ``"halfnormal"``: ``m = 1 + |N(0, sigma^2)|``;
- ``"exponential"``: ``m = 1 + Exp(sigma)``;
- ``"constant"``: ``m = 1``;
- ``"trace"``: read from the CSV file ``trace`` with a header row and the columns
  ``client, speed, up_mbps, down_mbps, availability``; ``availability`` is empty (always
  online) or windows ``start-end`` in seconds separated by ``;`` (repeating every
  ``period_s`` seconds if set).

``bandwidth_mbps`` is the median link speed; ``bandwidth`` picks its distribution (same
names, spread ``bandwidth_sigma``; default ``"constant"``).

Partial work (FedProx, Li et al. 2020): a fit task whose config carries
``"deadline_s"`` (the deadline policy sends it with ``partial_work=True``) trains only
the epochs that fit before it (at least one), so a straggler sends a smaller update in
time instead of none. The client plans before it trains, so it counts its upload as long
as its download.

Example::

    from fedhive.simulation import start_simulation
    from fedhive.simulation.system import SystemModel

    system = SystemModel(latency="lognormal", sigma=1.5, bandwidth_mbps=10.0,
                         num_examples={"0": 120, "1": 80}, dropout=0.05)
    history = start_simulation(client_fn=..., num_clients=2, system=system, seed=0)
    history.rounds[-1]["virtual_time_s"]
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhive.common.clock import Clock, VirtualClock
from fedhive.common.context import Context, Handler
from fedhive.common.errors import ConfigError
from fedhive.common.message import Message, MessageType, derive_seed
from fedhive.common.records import FitIns
from fedhive.server.client_manager import ClientManager, ClientProxy, Criterion
from fedhive.server.deadline import DEADLINE_KEY
from fedhive.transport.base import content_length

__all__ = [
    "DEADLINE_KEY",
    "DISTRIBUTIONS",
    "AvailableClients",
    "ClientProfile",
    "SystemLatency",
    "SystemModel",
    "TaskPlan",
]

DISTRIBUTIONS = ("lognormal", "pareto", "halfnormal", "exponential", "constant")


@dataclass(frozen=True)
class ClientProfile:
    """One virtual device: examples per second, link speeds, and when it is online
    (``windows`` of ``[start, end)`` seconds; empty: always)."""

    speed: float
    up_mbps: float
    down_mbps: float
    windows: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class TaskPlan:
    """What a task costs its client before its reply is uploaded: the epochs it trains,
    the simulated seconds until its upload starts (download and computing), and whether
    it is abandoned (then ``duration_s`` is when the error arrives); ``jitter`` is the
    task's duration factor, which its upload shares."""

    epochs: int
    duration_s: float
    dropped: bool
    jitter: float = 1.0


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _slowness(kind: str, sigma: float, rng: np.random.Generator) -> float:
    if kind == "lognormal":
        return float(np.exp(sigma * rng.standard_normal()))
    if kind == "pareto":
        return 1.0 + float(rng.pareto(1.0 / sigma)) if sigma > 0 else 1.0
    if kind == "halfnormal":
        return 1.0 + abs(sigma * float(rng.standard_normal()))
    if kind == "exponential":
        return 1.0 + sigma * float(rng.standard_exponential())
    return 1.0


def _windows(text: str, where: str) -> tuple[tuple[float, float], ...]:
    out = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        start, sep, end = part.partition("-")
        try:
            window = (float(start), float(end))
        except ValueError:
            window = (math.nan, math.nan)
        if not sep or not (0 <= window[0] < window[1] < math.inf):
            raise ConfigError(
                f"{where}: availability window {part!r} must be START-END in seconds with "
                "0 <= START < END (windows separated by ';')"
            )
        out.append(window)
    return tuple(sorted(out))


def read_trace(path: str | Path) -> dict[str, ClientProfile]:
    """Profiles from a trace CSV (see the module docstring); ConfigError naming the row."""
    columns = ("client", "speed", "up_mbps", "down_mbps", "availability")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ConfigError(f"cannot read the system trace {path}: {exc.strerror}") from exc
    profiles: dict[str, ClientProfile] = {}
    for number, row in enumerate(rows, start=2):
        where = f"{path}, row {number}"
        missing = [c for c in columns[:4] if not (row.get(c) or "").strip()]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)} (columns: {columns})")
        try:
            values = [float(row[c]) for c in columns[1:4]]
        except ValueError:
            raise ConfigError(f"{where}: speed, up_mbps and down_mbps must be numbers") from None
        speed, up, down = (
            _positive(f"{where}: {c}", v) for c, v in zip(columns[1:4], values, strict=True)
        )
        cid = str(row["client"]).strip()
        if cid in profiles:
            raise ConfigError(f"{where}: client {cid!r} appears twice")
        profiles[cid] = ClientProfile(
            speed, up, down, _windows(row.get("availability") or "", where)
        )
    if not profiles:
        raise ConfigError(f"the system trace {path} has no client rows")
    return profiles


#: Task draws a :class:`SystemModel` keeps (tasks in flight; cleared when full).
_DRAWS_KEPT = 4096


@dataclass(frozen=True)
class SystemModel:
    """Per-client compute speed and bandwidth, availability and dropout (module docstring).

    ``speed`` is the median compute speed in examples per second; ``jitter`` the sigma of
    each task's log-normal duration factor (0: none); ``seed`` is mixed with the run's
    task seeds (each client's profile is drawn from ``seed`` and its id).
    """

    latency: str = "lognormal"
    sigma: float = 1.5
    speed: float = 1000.0
    bandwidth_mbps: float = 10.0
    bandwidth: str = "constant"
    bandwidth_sigma: float = 0.5
    trace: str | Path = ""
    dropout: float = 0.0
    jitter: float = 0.0
    period_s: float | None = None
    num_examples: Mapping[str, int] = field(default_factory=dict)
    default_examples: int = 100
    seed: int = 0
    epochs_key: str = "local_epochs"
    _profiles: dict[str, ClientProfile] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    #: Each task's draws, by its seed: a task is planned when sent and again by the
    #: client's mod, and its upload timed once its reply exists (one generator, not three).
    _task_draws: dict[int, tuple[float, float, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.latency not in (*DISTRIBUTIONS, "trace"):
            raise ConfigError(
                f"latency must be one of {(*DISTRIBUTIONS, 'trace')}, got {self.latency!r}"
            )
        if self.bandwidth not in DISTRIBUTIONS:
            raise ConfigError(f"bandwidth must be one of {DISTRIBUTIONS}, got {self.bandwidth!r}")
        _non_negative("sigma", self.sigma)
        _non_negative("bandwidth_sigma", self.bandwidth_sigma)
        _non_negative("jitter", self.jitter)
        _positive("speed", self.speed)
        _positive("bandwidth_mbps", self.bandwidth_mbps)
        if self.period_s is not None:
            _positive("period_s", self.period_s)
        drop = self.dropout
        if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 1:
            raise ConfigError(f"dropout must be a probability in [0, 1), got {drop!r}")
        if self.default_examples < 1:
            raise ConfigError(f"default_examples must be >= 1, got {self.default_examples!r}")
        for cid, n in self.num_examples.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"num_examples[{cid!r}] must be an int >= 0, got {n!r}")
        if self.latency == "trace":
            if not str(self.trace):
                raise ConfigError('latency = "trace" needs trace = "path/to/trace.csv"')
            self._profiles.update(read_trace(self.trace))
        elif str(self.trace):
            raise ConfigError(
                f'a trace file is read only with latency = "trace" (latency is {self.latency!r})'
            )

    # -- devices -------------------------------------------------------------------------

    def profile(self, client_id: str) -> ClientProfile:
        """The client's device: from the trace, or drawn from the seed and its id."""
        if self.latency == "trace":
            found = self._profiles.get(client_id)
            if found is None:
                raise ConfigError(
                    f"client {client_id!r} is not in the system trace {self.trace} "
                    f"({len(self._profiles)} clients); add a row for it"
                )
            return found
        drawn = self._profiles.get(client_id)
        if drawn is None:  # drawn once per client (the cache is not part of the value)
            rng = np.random.default_rng(derive_seed(self.seed, 0, client_id, "system-device"))
            m = _slowness(self.latency, self.sigma, rng)
            b = _slowness(self.bandwidth, self.bandwidth_sigma, rng)
            link = self.bandwidth_mbps / b
            drawn = self._profiles[client_id] = ClientProfile(self.speed / m, link, link)
        return drawn

    @property
    def always_online(self) -> bool:
        """Whether every client is always available (drawn devices have no windows)."""
        return self.latency != "trace"

    def online(self, client_id: str, at: float) -> bool:
        """Whether the client is available at simulated time ``at``."""
        if self.latency != "trace":
            return True  # drawn devices have no availability windows
        windows = self.profile(client_id).windows
        if not windows:
            return True
        t = at % self.period_s if self.period_s else at
        return any(start <= t < end for start, end in windows)

    def next_online(self, client_ids: Sequence[str], at: float) -> float | None:
        """The earliest time after ``at`` at which one of ``client_ids`` comes online."""
        best: float | None = None
        for cid in client_ids:
            for start, _ in self.profile(cid).windows:
                times = [start]
                if self.period_s:
                    base = math.floor(at / self.period_s) * self.period_s
                    times = [base + start, base + self.period_s + start]
                for t in times:
                    if t > at and (best is None or t < best):
                        best = t
        return best

    # -- tasks ---------------------------------------------------------------------------

    def _draws(self, task: Message) -> tuple[float, bool, float]:
        """The task's own draws: (jitter factor, dropped, where it drops)."""
        meta = task.metadata
        if not self.jitter and not self.dropout:
            return 1.0, False, 1.0  # nothing drawn would be used
        draws = self._task_draws.get(meta.seed)
        if draws is None:
            rng = np.random.default_rng(derive_seed(self.seed, 0, str(meta.seed), "system-task"))
            draws = (float(rng.standard_normal()), float(rng.random()), float(rng.random()))
            if len(self._task_draws) >= _DRAWS_KEPT:
                self._task_draws.clear()
            self._task_draws[meta.seed] = draws
        noise, drop, where = draws
        factor = math.exp(self.jitter * noise) if self.jitter else 1.0
        return factor, meta.message_type == MessageType.FIT and drop < self.dropout, where

    def dropped(self, task: Message) -> bool:
        """Whether ``task`` is abandoned midway (its :meth:`plan`'s ``dropped``, without
        the rest of the plan)."""
        return self._draws(task)[1]

    def plan(self, task: Message) -> TaskPlan:
        """Epochs, simulated seconds until the upload starts, and dropout of ``task``
        (deterministic per task)."""
        meta = task.metadata
        device = self.profile(meta.node_id)
        factor, dropped, where = self._draws(task)
        size = content_length(task)
        down = size * 8 / (device.down_mbps * 1e6)
        examples = self.num_examples.get(meta.node_id, self.default_examples)
        per_epoch = examples / device.speed
        epochs = 0
        compute = 0.0
        if meta.message_type == MessageType.FIT and isinstance(task.content, FitIns):
            # planned before training: the update is counted as long as the model
            up = size * 8 / (device.up_mbps * 1e6)
            epochs = self._epochs(task.content.config, per_epoch, down + up)
            compute = epochs * per_epoch
        elif meta.message_type == MessageType.EVALUATE:
            compute = per_epoch  # one pass over (at most) its data
        duration = (compute + down) * factor
        if dropped:
            duration *= where
        return TaskPlan(epochs, duration, dropped, factor)

    def upload_seconds(self, task: Message, reply_bytes: int) -> float:
        """Simulated seconds the reply to ``task``, ``reply_bytes`` long on the wire, takes
        to upload (0 for a dropped task: its client gave up)."""
        factor, dropped, _ = self._draws(task)
        if dropped:
            return 0.0
        return reply_bytes * 8 / (self.profile(task.metadata.node_id).up_mbps * 1e6) * factor

    def _epochs(self, config: Mapping[str, Any], per_epoch: float, transfer: float) -> int:
        epochs = config.get(self.epochs_key, 1)
        epochs = (
            int(epochs) if isinstance(epochs, int | float) and not isinstance(epochs, bool) else 1
        )
        deadline = config.get(DEADLINE_KEY)
        if isinstance(deadline, int | float) and not isinstance(deadline, bool) and per_epoch > 0:
            fits = math.floor((float(deadline) - transfer) / per_epoch)
            epochs = max(1, min(epochs, fits))
        return max(epochs, 0)

    def task_seconds(self, task: Message) -> float:
        """Simulated seconds until the task's reply starts to upload (its download and
        computing); the upload is :meth:`upload_seconds`."""
        return self.plan(task).duration_s

    def transport_latency(self) -> SystemLatency:
        """The transport's latency for this model (:class:`SystemLatency`)."""
        return SystemLatency(self)

    def mod(self) -> SystemMod:
        """The client mod that plays each task's dropout and partial work."""
        return SystemMod(self)

    def attach(
        self, clock: Clock | None, latency: Any, mods: Sequence[Any]
    ) -> tuple[VirtualClock, Any, tuple[Any, ...]]:
        """(clock, latency, mods) of a simulation run with this model."""
        if clock is not None and not isinstance(clock, VirtualClock):
            raise ConfigError(
                "system= simulates time, so the run needs a VirtualClock; got "
                f"{type(clock).__name__}"
            )
        if latency is not None:
            raise ConfigError("pass system= or latency=, not both (the system model gives latency)")
        return clock or VirtualClock(), self.transport_latency(), (self.mod(), *mods)


@dataclass(frozen=True)
class SystemLatency:
    """A :class:`SystemModel` as an in-process transport's latency
    (:mod:`fedhive.transport.inprocess`): a task's seconds until its upload starts, when
    it is sent; the upload of its real reply, once that is computed."""

    model: SystemModel

    def __call__(self, task: Message) -> float:
        return self.model.task_seconds(task)

    def upload_seconds(self, task: Message, reply_bytes: int) -> float:
        return self.model.upload_seconds(task, reply_bytes)


@dataclass(frozen=True)
class SystemMod:
    """Client side of a :class:`SystemModel`: a dropped task answers with an error
    without training; partial work trains only the epochs its plan allows."""

    model: SystemModel

    def __call__(self, message: Message, context: Context, call_next: Handler) -> Message:
        if message.metadata.message_type != MessageType.FIT:
            return call_next(message, context)
        if self.model.dropped(message):
            return message.error_reply(
                f"the client dropped out mid-task (simulated: dropout = {self.model.dropout})"
            )
        content = message.content
        if isinstance(content, FitIns) and DEADLINE_KEY in content.config:
            # only a deadline needs the whole plan (its transfer times: the task's size)
            config = {**content.config, self.model.epochs_key: self.model.plan(message).epochs}
            message = Message(
                message.metadata, FitIns(content.parameters, config, content.extras), None
            )
        return call_next(message, context)


class AvailableClients:
    """A client manager that offers only the clients online at the clock's time.

    When fewer are online than a sample needs, simulated time moves on to the next time
    a client comes online (as a server waits for clients to connect).
    """

    def __init__(self, manager: ClientManager, model: SystemModel, clock: Clock) -> None:
        self.manager = manager
        self.model = model
        self.clock = clock

    def _online(self) -> list[str]:
        now = self.clock.now()
        return [cid for cid in self.manager.all() if self.model.online(cid, now)]

    def set_sampling_seed(self, seed: int) -> None:
        setter = getattr(self.manager, "set_sampling_seed", None)
        if setter is not None:
            setter(seed)

    def num_available(self) -> int:
        if self.model.always_online:  # O(1): nobody to leave out
            return self.manager.num_available()
        return len(self._online())

    def all(self) -> dict[str, ClientProxy]:
        if self.model.always_online:
            return self.manager.all()
        return {cid: ClientProxy(cid) for cid in self._online()}

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        if self.model.always_online:
            # the manager's own sampling, without listing every client per draw (the
            # asynchronous policy's O(k) sampling of idle clients stays O(k))
            return self.manager.sample(num_clients, min_num_clients, criterion)
        needed = max(num_clients, min_num_clients or 0)
        everyone = list(self.manager.all())
        for _ in range(10_000):
            if len(self._online()) >= needed:
                break
            later = self.model.next_online(everyone, self.clock.now())
            if later is None or not isinstance(self.clock, VirtualClock):
                break
            self.clock.advance(later - self.clock.now())
        return self.manager.sample(num_clients, min_num_clients, _Online(self, criterion))


class _Online:
    def __init__(self, view: AvailableClients, criterion: Criterion | None) -> None:
        self.now = view.clock.now()
        self.model = view.model
        self.criterion = criterion

    def select(self, client: ClientProxy) -> bool:
        if not self.model.online(client.cid, self.now):
            return False
        return self.criterion is None or self.criterion.select(client)
