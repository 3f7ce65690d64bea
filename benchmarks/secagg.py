"""SecAgg+ cost: client time, server time and bytes per client, next to plain FedAvg rounds.

Issue 7's grid: n in {10, 100, 1000} clients x P in {100k, 1M} float32 parameters (three
arrays), with and without 10% dropouts, SecAgg+ with the default degree; plus the
complete graph (every client a neighbour, SecAgg) at n = 50 and 100. Every SecAgg+ run
has a plain FedAvg run of the same size in the same process, started just before it.

Setup: ``start_simulation``, thread backend, ``num_workers=1`` (client work runs on one
worker thread, the server on the calling thread, so they can be told apart), seed 0,
``FedAvg(fraction_fit=1.0, fraction_evaluate=0.0)``, ``SecAggPlusWorkflow(degree=...,
bits=12, clip=1.0)``. Client compute is trivial: ``fit`` returns ``parameters + d`` with
d = 0.001 x (1 + id mod 7) and ``num_examples = 1 + id mod 10``, so the expected model is
known exactly and every run is checked against it (SecAgg+ within one quantization step
per round).

Dropouts: a mod placed before ``secaggplus_mod`` raises on ``fit`` for a fixed 10% of the
client ids (drawn once with ``random.Random(7)``), i.e. they drop *after* sharing their
keys, the costly case: the server rebuilds their mask keys and removes their pairwise
masks. The plain run of a dropout row drops the same clients in ``fit``.

What is measured, per round (round 1 of each run is a warm-up and the byte-counting
round; the medians are over the timed rounds after it: 5 at n=100 x 1M, 1 at
n=1000 x 1M, where one SecAgg+ round takes ~1.5 min, and 3 elsewhere):

- **round s**: the whole round's wall time (the history's ``elapsed_s`` differences).
- **server s**: CPU seconds of the server thread (``time.thread_time``) inside the fit
  round: building and relaying messages, checking adverts, folding, Shamir
  reconstruction, mask removal, handing the mean to the strategy. The plain run's value
  is the plain aggregation: the engine's fit round, i.e. building the tasks,
  ``check_update`` and FedAvg's streaming fold of every update, then ``finalize``. The
  split: the round's ``secagg.server_seconds`` (wall seconds on the server thread: fold,
  shamir, mask_expansion; "unmask rest" = unmask - shamir - mask_expansion) plus
  "hand-off" (``SecureRound.hand_to_strategy``, timed by wrapping it in this process);
  server CPU s minus their sum is messages, advert and signature checks. Also shown:
  the round's wall time minus the client-app time (server work not overlapped with
  client work, plus the in-process transport), for both runs.
- **client s/update**: ``SecAggPlusMod(timings=...)`` seconds (key agreement = X25519 +
  HKDF + AES-GCM of shares; graph = checking the commitments and reveals and deriving
  the neighbours; shamir; quantize; mask expansion; consistency = signing the
  survivor set and checking every neighbour's signature)
  summed over all clients, divided by the number of masked updates received (the
  survivors). "handler delta" cross-checks it: the time inside the client app (all
  mods, ``client_fn``, ``fit``) of the SecAgg+ run minus that of the plain run, per
  update; it also holds what the mod does not time (message handling).
- **bytes/client**: every message a client receives (down) and sends (up), encoded with
  the wire codec the gRPC transport uses (``fedhive.transport.codec.encode_wire``: length
  prefix, metadata, content) and summed over all stages of the round, averaged over the
  n sampled clients (a dropped client downloads its fit task and sends nothing more).
  Counted by a mod placed first, in round 1 only, so encoding costs no timed round
  anything. gRPC/HTTP/2 framing (about 50 bytes per 1 MiB chunk) is not included.

The machine is shared (2 CPUs): absolute times vary between runs, the ratios within a
row (both runs back to back in one process) are what to compare.

Run::

    .venv/bin/python benchmarks/secagg.py                 # the grid, ~15 min
    .venv/bin/python benchmarks/secagg.py --quick         # smoke run, a few seconds
    .venv/bin/python benchmarks/secagg.py --skip-largest  # without n=1000 x 1M
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from _repro import Report, log, median, results_path, table
from fedhive.client import NumPyClient
from fedhive.client.context import Context
from fedhive.common.message import Message, MessageType
from fedhive.common.records import NDArrays, Scalar, ndarrays_to_parameters
from fedhive.secagg import SecAggPlusMod, SecAggPlusWorkflow
from fedhive.secagg import server as secagg_server
from fedhive.server.config import ServerConfig
from fedhive.server.engine import Engine, RoundCallback, RoundDriver, default_fit_workflow
from fedhive.server.strategy import FedAvg
from fedhive.simulation import start_simulation
from fedhive.transport.codec import encode_wire

BITS, CLIP = 12, 1.0
STEP = 2.0 * CLIP / ((1 << BITS) - 1)  # one quantization step
DROP_FRACTION = 0.1
TARGET_AT = (100, 1_000_000)
TARGET_BYTES = 1.1  # x plain upload per client
TARGET_CLIENT_S = 0.1  # s per update
TARGET_SERVER = 3.0  # x plain aggregation, no dropouts
TARGET_SERVER_DROP = 5.0  # x plain aggregation, 10% dropouts
TARGET_COMPLETE = 3.0  # whole round x plain round, complete graph, n = 100
CLIENT_PARTS = ("key_agreement", "graph", "shamir", "quantize", "mask_expansion", "consistency")
STAGES = (
    "secagg.advertise",
    "secagg.graph",
    "secagg.share_keys",
    MessageType.FIT,
    "secagg.consistency",
    "secagg.unmask",
)
K = 1000


# -- clients ------------------------------------------------------------------------------


def shift(pid: int) -> float:
    return 0.001 * (1 + pid % 7)


def weight(pid: int) -> int:
    return 1 + pid % 10


class BenchClient(NumPyClient):
    """Trivial compute: the model plus a per-client constant."""

    def __init__(self, pid: int) -> None:
        self.delta = np.float32(shift(pid))
        self.num = weight(pid)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict]:
        return [p + self.delta for p in parameters], self.num, {}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict]:
        return 0.0, 1, {}


def client_fn(context: Context) -> NumPyClient:
    return BenchClient(int(context.node_config["partition-id"]))


def initial_model(num_params: int) -> NDArrays:
    """Three float32 arrays: a (rows, 100) matrix with ~60%, a vector with ~30%, the rest."""
    big = num_params * 6 // 10
    cols = min(100, max(1, big))
    rows = max(1, big // cols)
    mid = num_params * 3 // 10
    rest = num_params - rows * cols - mid
    rng = np.random.default_rng(0)
    shapes = [(rows, cols), (mid,), (rest,)]
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


def dropped_ids(n: int, fraction: float) -> frozenset[str]:
    count = round(n * fraction)
    return frozenset(str(i) for i in random.Random(7).sample(range(n), count))


# -- mods and probes ----------------------------------------------------------------------


def wire_size(message: Message) -> int:
    return sum(len(piece) for piece in encode_wire(message))


class Meter:
    """First mod: time inside the client app per round; wire bytes per stage in one round."""

    def __init__(self, count_round: int = 1) -> None:
        self.count_round = count_round
        self.handler_s: dict[int, float] = defaultdict(float)
        self.down: dict[str, int] = defaultdict(int)
        self.up: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def __call__(self, message: Message, context: Context, call_next: Callable) -> Message:
        meta = message.metadata
        counting = meta.server_round == self.count_round
        if counting:
            size = wire_size(message)
            with self._lock:
                self.down[meta.message_type] += size
        start = time.perf_counter()
        try:
            reply = call_next(message, context)
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.handler_s[meta.server_round] += elapsed
        if counting and reply.error is None:
            size = wire_size(reply)
            with self._lock:
                self.up[meta.message_type] += size
        return reply


class Dropout:
    """Raises on ``fit`` for the chosen clients: they drop after sharing their keys."""

    def __init__(self, ids: frozenset[str]) -> None:
        self.ids = ids

    def __call__(self, message: Message, context: Context, call_next: Callable) -> Message:
        if message.metadata.message_type == MessageType.FIT and context.node_id in self.ids:
            raise ConnectionError("benchmark dropout")
        return call_next(message, context)


class TimedWorkflow:
    """Wraps a fit workflow: server-thread wall and CPU seconds per round."""

    def __init__(self, inner: Callable[[RoundDriver], None]) -> None:
        self.inner = inner
        self.cpu: dict[int, float] = {}
        self.wall: dict[int, float] = {}

    def __call__(self, driver: RoundDriver) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            self.inner(driver)
        finally:
            self.cpu[driver.server_round] = time.thread_time() - cpu
            self.wall[driver.server_round] = time.perf_counter() - wall


class Probe(RoundCallback):
    """The mod's accumulated timings per round, and the final model."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.parts: dict[int, dict[str, float]] = {}
        self._before: dict[str, float] = {}
        self.model: NDArrays = []

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        now = dict(self.timings)
        rnd = int(record["round"])
        self.parts[rnd] = {k: v - self._before.get(k, 0.0) for k, v in now.items()}
        self._before = now

    def on_run_end(self, engine: Engine, history: Any) -> None:
        self.model = [np.asarray(a) for a in engine.parameters.arrays]


_HANDOFF: dict[int, float] = defaultdict(float)


@contextmanager
def time_handoff() -> Iterator[None]:
    """Time ``SecureRound.hand_to_strategy`` (the mean handed to FedAvg) per round."""
    # the round class: SecureRound, or _SecureRound in trees before the split
    cls = getattr(secagg_server, "SecureRound", None) or getattr(
        secagg_server, "_SecureRound", None
    )
    original = getattr(cls, "hand_to_strategy", None)
    if cls is None or original is None:
        yield
        return

    def timed(self: Any, mean: NDArrays) -> Any:
        start = time.perf_counter()
        try:
            return original(self, mean)
        finally:
            _HANDOFF[self.rnd] += time.perf_counter() - start

    cls.hand_to_strategy = timed
    try:
        yield
    finally:
        cls.hand_to_strategy = original


# -- one run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    n: int
    params: int
    drop: float = 0.0
    degree: int | str | None = None
    rounds: int = 3  # timed rounds, after the warm-up/counting round

    @property
    def label(self) -> str:
        graph = "complete" if self.degree == "complete" else "default k"
        drop = f"{self.drop:.0%} drop" if self.drop else "no drop"
        return f"n={self.n} P={fmt_params(self.params)} {graph} {drop}"


@dataclass
class Run:
    """One start_simulation: per timed round values, and round-1 byte counts."""

    round_s: list[float]
    server_cpu: list[float]
    handler_s: list[float]
    results: list[int]
    client_parts: list[dict[str, float]] = field(default_factory=list)
    server_parts: list[dict[str, float]] = field(default_factory=list)
    handoff: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    up: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)
    error: float = 0.0


def run(cfg: Config, secure: bool) -> Run:
    drops = dropped_ids(cfg.n, cfg.drop)
    meter = Meter(count_round=1)
    timings: dict[str, float] = {}
    probe = Probe(timings)
    mods: list[Any] = [meter]
    if drops:
        mods.append(Dropout(drops))
    inner: Callable[[RoundDriver], None] = default_fit_workflow
    if secure:
        mods.append(SecAggPlusMod(timings=timings))
        inner = SecAggPlusWorkflow(degree=cfg.degree, bits=BITS, clip=CLIP)
    workflow = TimedWorkflow(inner)
    model = initial_model(cfg.params)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=cfg.n,
        min_available_clients=cfg.n,
        initial_parameters=ndarrays_to_parameters(model),
    )
    total_rounds = 1 + cfg.rounds
    _HANDOFF.clear()
    history = start_simulation(
        client_fn=client_fn,
        num_clients=cfg.n,
        strategy=strategy,
        config=ServerConfig(num_rounds=total_rounds),
        backend="thread",
        num_workers=1,
        seed=0,
        mods=mods,
        callbacks=[probe],
        fit_workflow=workflow,
    )
    records = [r for r in history.rounds if r.get("round", 0) >= 1]
    elapsed = [0.0] + [float(r["elapsed_s"]) for r in records]
    timed = range(2, total_rounds + 1)
    out = Run(
        round_s=[elapsed[r] - elapsed[r - 1] for r in timed],
        server_cpu=[workflow.cpu[r] for r in timed],
        handler_s=[meter.handler_s[r] for r in timed],
        results=[int(r["fit"]["num_results"]) for r in records],
        up=dict(meter.up),
        down=dict(meter.down),
    )
    expected_results = cfg.n - len(drops)
    if out.results != [expected_results] * total_rounds:
        raise RuntimeError(f"{cfg.label}: fit results per round {out.results}")
    if secure:
        out.client_parts = [probe.parts.get(r, {}) for r in timed]
        out.server_parts = [dict(records[r - 1]["fit"]["secagg"]["server_seconds"]) for r in timed]
        out.handoff = [_HANDOFF.get(r, 0.0) for r in timed]
        out.stats = dict(records[-1]["fit"]["secagg"])
    # The expected model: each round moves every parameter by the weighted mean shift.
    alive = [i for i in range(cfg.n) if str(i) not in drops]
    mean_shift = sum(weight(i) * shift(i) for i in alive) / sum(weight(i) for i in alive)
    errors = []
    for final, first in zip(probe.model, model, strict=True):
        expected = first.astype(np.float64) + total_rounds * mean_shift
        errors.append(float(np.max(np.abs(final.astype(np.float64) - expected))))
    out.error = max(errors)
    bound = total_rounds * (STEP if secure else 0.0) + 1e-5 * total_rounds
    if not out.error <= bound:
        raise RuntimeError(f"{cfg.label}: model off by {out.error:.3g} > {bound:.3g}")
    return out


# -- formatting ----------------------------------------------------------------------------


def fmt_params(p: int) -> str:
    if p >= 1_000_000 and p % 1_000_000 == 0:
        return f"{p // 1_000_000}M"
    if p >= K and p % K == 0:
        return f"{p // K}k"
    return str(p)


def fmt_s(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.4f}"
    return f"{seconds:.3g}" if seconds < 100 else f"{seconds:.0f}"


def fmt_bytes(b: float) -> str:
    if b >= 1e6:
        return f"{b / 1e6:.3f} MB"
    if b >= 1e3:
        return f"{b / 1e3:.1f} kB"
    return f"{b:.0f} B"


def status(value: float, target: float) -> str:
    return "PASS" if value <= target else "ABOVE TARGET"


@dataclass
class Row:
    cfg: Config
    plain: Run
    secure: Run

    @property
    def updates(self) -> int:
        return self.secure.results[-1]

    def client_per_update(self) -> float:
        totals = [sum(p.get(k, 0.0) for k in CLIENT_PARTS) for p in self.secure.client_parts]
        return median(totals) / self.updates

    def handler_delta(self) -> float:
        deltas = [s - p for s, p in zip(self.secure.handler_s, self.plain.handler_s, strict=False)]
        return median(deltas) / self.updates

    def part(self, name: str) -> float:
        """Median per round of a client part, per update."""
        return median([p.get(name, 0.0) for p in self.secure.client_parts]) / self.updates

    def server_split(self) -> dict[str, float]:
        """Medians per round of the server parts (wall s), their sum, the server CPU s and
        the round's wall time minus the client-app time, SecAgg+ and plain."""
        rows = []
        runs = zip(
            self.secure.server_parts,
            self.secure.handoff,
            self.secure.server_cpu,
            self.secure.round_s,
            self.secure.handler_s,
            strict=True,
        )
        for parts, handoff, cpu, wall, client in runs:
            shamir = parts.get("shamir", 0.0)
            masks = parts.get("mask_expansion", 0.0)
            split = {
                "fold": parts.get("fold", 0.0),
                "shamir": shamir,
                "mask_expansion": masks,
                "unmask_rest": parts.get("unmask", 0.0) - shamir - masks,
                "handoff": handoff,
            }
            split["sum"] = sum(split.values())
            split["cpu"] = cpu
            split["wall_minus_client"] = wall - client
            rows.append(split)
        out = {k: median([r[k] for r in rows]) for k in rows[0]}
        plain = [w - c for w, c in zip(self.plain.round_s, self.plain.handler_s, strict=True)]
        out["plain_wall_minus_client"] = median(plain)
        return out

    def bytes_per_client(self, run: Run) -> tuple[float, float]:
        return sum(run.up.values()) / self.cfg.n, sum(run.down.values()) / self.cfg.n

    def ratios(self) -> tuple[float, float, float]:
        """(round, server, upload bytes) SecAgg+ / plain."""
        round_x = median(self.secure.round_s) / median(self.plain.round_s)
        server_x = median(self.secure.server_cpu) / median(self.plain.server_cpu)
        up_x = self.bytes_per_client(self.secure)[0] / self.bytes_per_client(self.plain)[0]
        return round_x, server_x, up_x


def time_table(rows: Sequence[Row]) -> str:
    headers = [
        "config",
        "k/t",
        "rounds",
        "plain round s",
        "SecAgg+ round s",
        "x",
        "plain server s",
        "SecAgg+ server s",
        "x",
        "client s/update",
        "handler delta s/update",
    ]
    body = []
    for row in rows:
        round_x, server_x, _ = row.ratios()
        stats = row.secure.stats
        body.append(
            [
                row.cfg.label,
                f"{stats.get('degree')}/{stats.get('threshold')}",
                str(row.cfg.rounds),
                fmt_s(median(row.plain.round_s)),
                fmt_s(median(row.secure.round_s)),
                f"{round_x:.2f}x",
                fmt_s(median(row.plain.server_cpu)),
                fmt_s(median(row.secure.server_cpu)),
                f"{server_x:.2f}x",
                f"{row.client_per_update():.4f}",
                f"{row.handler_delta():.4f}",
            ]
        )
    return table(headers, body)


SERVER_COLUMNS = (
    "fold",
    "shamir",
    "mask_expansion",
    "unmask_rest",
    "handoff",
    "sum",
    "cpu",
    "wall_minus_client",
    "plain_wall_minus_client",
)


def split_table(rows: Sequence[Row]) -> str:
    headers = [
        "config",
        "client ms/update: key agr",
        "graph",
        "shamir",
        "quantize",
        "mask exp",
        "consistency",
        "| server ms/round: fold",
        "shamir",
        "mask exp",
        "unmask rest",
        "hand-off",
        "sum",
        "server CPU",
        "| wall-client",
        "plain wall-client",
    ]
    body = []
    for row in rows:
        split = row.server_split()
        body.append(
            [
                row.cfg.label,
                *(f"{row.part(k) * 1e3:.2f}" for k in CLIENT_PARTS),
                *(f"{split[k] * 1e3:.1f}" for k in SERVER_COLUMNS),
            ]
        )
    return table(headers, body)


def bytes_table(rows: Sequence[Row]) -> str:
    headers = [
        "config",
        "plain up/client",
        "plain down/client",
        "SecAgg+ up/client",
        "SecAgg+ down/client",
        "up x",
        "up+down x",
        "SecAgg+ up by stage (adv/graph/share/fit/cons/unmask)",
    ]
    body = []
    for row in rows:
        p_up, p_down = row.bytes_per_client(row.plain)
        s_up, s_down = row.bytes_per_client(row.secure)
        stages = "/".join(fmt_bytes(row.secure.up.get(s, 0) / row.cfg.n) for s in STAGES)
        body.append(
            [
                row.cfg.label,
                fmt_bytes(p_up),
                fmt_bytes(p_down),
                fmt_bytes(s_up),
                fmt_bytes(s_down),
                f"{s_up / p_up:.4f}x",
                f"{(s_up + s_down) / (p_up + p_down):.4f}x",
                stages,
            ]
        )
    return table(headers, body)


def target_table(rows: Sequence[Row], at: tuple[int, int]) -> tuple[str, list[str]]:
    n, params = at
    found = {
        r.cfg.drop: r
        for r in rows
        if r.cfg.n == n and r.cfg.params == params and r.cfg.degree is None
    }
    body, statuses = [], []

    def add(name: str, value: float, unit: str, target: float) -> None:
        ok = status(value, target)
        shown = f"{value:.4f} s" if unit == "s" else f"{value:.3f}x"
        body.append([name, shown, f"<= {target}{' s' if unit == 's' else 'x'}", ok])
        statuses.append(ok)

    base = found.get(0.0)
    if base is not None:
        _, server_x, up_x = base.ratios()
        add("bytes up per client vs plain", up_x, "x", TARGET_BYTES)
        add("client overhead per update", base.client_per_update(), "s", TARGET_CLIENT_S)
        add("server vs plain aggregation, no drop", server_x, "x", TARGET_SERVER)
    drop = next((r for d, r in found.items() if d > 0), None)
    if drop is not None:
        _, server_x, _ = drop.ratios()
        name = f"server vs plain aggregation, {drop.cfg.drop:.0%} drop"
        add(name, server_x, "x", TARGET_SERVER_DROP)
    if not body:
        return f"(no default-degree row at n={n} x P={fmt_params(params)})", []
    return table(["target", "measured", "target", "status"], body), statuses


def complete_table(rows: Sequence[Row], target_n: int) -> str:
    headers = [
        "config",
        "k/t",
        "plain round s",
        "SecAgg round s",
        "whole round x",
        "target",
        "status",
        "client s/update",
        "server s",
    ]
    body = []
    for row in rows:
        round_x, _, _ = row.ratios()
        is_target = row.cfg.n == target_n
        stats = row.secure.stats
        body.append(
            [
                row.cfg.label,
                f"{stats.get('degree')}/{stats.get('threshold')}",
                fmt_s(median(row.plain.round_s)),
                fmt_s(median(row.secure.round_s)),
                f"{round_x:.2f}x",
                f"<= {TARGET_COMPLETE}x" if is_target else "-",
                status(round_x, TARGET_COMPLETE) if is_target else "-",
                f"{row.client_per_update():.4f}",
                fmt_s(median(row.secure.server_cpu)),
            ]
        )
    return table(headers, body)


def code_fingerprint() -> str:
    """sha256 of the fedhive.secagg sources (they change; results belong to one state)."""
    folder = Path(secagg_server.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"src/fedhive/secagg/*.py sha256 {digest.hexdigest()[:12]}"


def machine_note() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"machine: {os.cpu_count()} CPUs, load average {load} (1/5/15 min)"


# -- main ----------------------------------------------------------------------------------


def measure(cfg: Config) -> Row:
    log(f"{cfg.label}, {cfg.rounds} timed rounds: plain")
    plain = run(cfg, secure=False)
    log(f"{cfg.label}: SecAgg+")
    with time_handoff():
        secure = run(cfg, secure=True)
    row = Row(cfg, plain, secure)
    round_x, server_x, up_x = row.ratios()
    log(f"  round {round_x:.2f}x, server {server_x:.2f}x, up bytes {up_x:.4f}x")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: tiny sizes, a few seconds")
    add("--clients", type=int, nargs="+", help="default 10 100 1000 (--quick: 6 10)")
    add("--params", type=int, nargs="+", help="default 100000 1000000 (--quick: 1000)")
    add("--rounds", type=int, help="timed rounds after the warm-up round (default 3; --quick 1)")
    add("--largest-rounds", type=int, default=1, help="timed rounds at n=1000 x 1M (default 1)")
    add("--target-rounds", type=int, help="timed rounds at n=100 x 1M (default 5; --quick 1)")
    add("--complete-clients", type=int, nargs="*", help="complete graph (default 50 100)")
    add("--complete-params", type=int, nargs="*", help="default 1000 100000 1000000")
    add("--skip-largest", action="store_true", help="leave out n=1000 x 1M")
    add("--out", help="default benchmarks/results/secagg.txt (--quick: no file)")
    args = parser.parse_args(argv)
    quick = args.quick
    clients = args.clients or ([6, 10] if quick else [10, 100, 1000])
    params = args.params or ([1000] if quick else [100_000, 1_000_000])
    rounds = args.rounds or (1 if quick else 3)
    target_rounds = args.target_rounds or args.rounds or (1 if quick else 5)
    complete_n = args.complete_clients
    if complete_n is None:
        complete_n = [6] if quick else [50, 100]
    complete_p = args.complete_params
    if complete_p is None:
        complete_p = [1000] if quick else [1000, 100_000, 1_000_000]
    target_at = (max(clients), max(params)) if quick else TARGET_AT
    report = Report(__file__, results_path("secagg", quick, args.out))

    note, code = machine_note(), code_fingerprint()
    start = time.perf_counter()
    grid: list[Row] = []
    for n in clients:
        for p in params:
            largest = n >= 1000 and p >= 1_000_000
            if largest and args.skip_largest:
                continue
            r = args.largest_rounds if largest else rounds
            if (n, p) == target_at:
                r = target_rounds
            for drop in (0.0, DROP_FRACTION):
                grid.append(measure(Config(n, p, drop, None, r)))
    complete: list[Row] = []
    for n in complete_n:
        for p in complete_p:
            complete.append(measure(Config(n, p, 0.0, "complete", rounds)))
    minutes = (time.perf_counter() - start) / 60

    report(
        f"SecAgg+ vs plain FedAvg in simulation (thread backend, 1 worker, trivial client "
        f"compute), bits={BITS}, clip={CLIP}"
    )
    report(f"{note} at start; whole benchmark {minutes:.1f} min")
    changed = "" if code_fingerprint() == code else " (CHANGED during the run: rerun)"
    report(f"measured code: {code}{changed}")
    report(
        "Medians over the timed rounds (after one warm-up round, which also counts the "
        "bytes); 'x' = SecAgg+ / plain run of the same row, measured just before it"
    )
    report("(the machine is shared: absolute times vary, the same-run ratios are what to compare)")
    report("\nTime: round = whole round wall s; server = server-thread CPU s in the fit round")
    report("(plain server s = the plain aggregation); client s/update = SecAggPlusMod parts")
    report("summed over clients / masked updates; handler delta = client-app time, SecAgg+ -")
    report("plain, per update\n")
    report(time_table(grid + complete))
    report("\nWhere the time goes (medians per round). Client: SecAggPlusMod parts per update.")
    report("Server: secagg.server_seconds parts per round, wall seconds of the server thread;")
    report("'unmask rest' = unmask - shamir - mask exp; 'hand-off' = handing the mean to the")
    report("strategy; 'sum' = these parts; 'server CPU' = all server-thread CPU in the fit round")
    report("(CPU - sum = messages, advert and signature checks; parts are wall time, so on a busy")
    report("machine sum can exceed CPU); wall-client = round wall s - client-app s (server work")
    report("not overlapped with clients, plus the transport), for SecAgg+ and the plain run\n")
    report(split_table(grid + complete))
    report("\nBytes per client per round, all stages, over the wire codec (encode_wire), mean")
    report("over the n sampled clients; 'up x' = SecAgg+ upload / plain fit upload\n")
    report(bytes_table(grid + complete))
    n, p = target_at
    text, statuses = target_table(grid, target_at)
    report(f"\nTargets at n={n} x P={fmt_params(p)}, default degree\n")
    report(text)
    base = next((r for r in grid if (r.cfg.n, r.cfg.params) == target_at and not r.cfg.drop), None)
    if base is not None:
        report(
            f"(cross-check: client-app time, SecAgg+ - plain, per update = "
            f"{base.handler_delta():.4f} s; it also holds the work the mod does not time)"
        )
    if statuses:
        passed = statuses.count("PASS")
        report(f"\n{passed} of {len(statuses)} targets at n={n} x P={fmt_params(p)} pass")
    if complete:
        target_n = max(c.cfg.n for c in complete)
        report(
            f"\nComplete graph (SecAgg, every client a neighbour): whole round vs plain round; "
            f"target <= {TARGET_COMPLETE}x at n={target_n}"
        )
        report(
            "(Flower 1.42 SecAgg+ on this machine, trivial compute: 3.3-3.7x with 3 shares, "
            "42x at n=50 and 171x at n=100 complete)\n"
        )
        report(complete_table(complete, target_n))
    worst = max(r.secure.error for r in grid + complete)
    report(
        f"\nmodel check: every run's final model matched the exact FedAvg result; SecAgg+ "
        f"max abs error {worst:.2e} after all its rounds (bound: one quantization step, "
        f"{STEP:.2e}, per round)"
    )
    report.finish(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
