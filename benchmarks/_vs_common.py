"""What both sides of vs_flower.py share: the workloads' sizes, the client training code,
memory sampling. Imports only numpy and the standard library, so Flower's environment
runs it too."""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

import numpy as np

#: Trivial-client overhead: clients per round, rounds per run.
OVERHEAD_CLIENTS, OVERHEAD_ROUNDS = 100, 12
#: MNIST-1D MLP: registered clients, fraction per round, rounds, samples per client.
MLP_CLIENTS, MLP_FRACTION, MLP_ROUNDS, MLP_SAMPLES = 1000, 0.1, 6, 16
MLP_SIZES = (40, 64, 10)
#: Aggregation: results x parameters (float32).
AGG_RESULTS, AGG_PARAMS = 100, 1_000_000
#: gRPC: model parameters (100 MB of float32), client processes, measured rounds.
GRPC_PARAMS, GRPC_CLIENTS, GRPC_ROUNDS = 25_000_000, 4, 3
#: SecAgg+: clients, parameters, measured rounds (after one warm-up round).
SECAGG_CLIENTS, SECAGG_PARAMS, SECAGG_ROUNDS = 50, 1_000_000, 2


def mlp_init() -> list[np.ndarray]:
    """The MNIST-1D MLP's weights (40 -> 64 -> 10), seeded."""
    rng = np.random.default_rng(0)
    out: list[np.ndarray] = []
    for fan_in, fan_out in itertools.pairwise(MLP_SIZES):
        w = rng.normal(scale=np.sqrt(2.0 / fan_in), size=(fan_in, fan_out)).astype(np.float32)
        out += [w, np.zeros(fan_out, np.float32)]
    return out


def client_rows(pid: int, num_train: int) -> np.ndarray:
    """The client's samples: ``MLP_SAMPLES`` rows drawn with its partition id's seed."""
    return np.random.default_rng(pid).choice(num_train, MLP_SAMPLES, replace=False)


def mlp_train(
    params: list[np.ndarray], x: np.ndarray, y: np.ndarray, seed: int
) -> list[np.ndarray]:
    """One epoch of SGD (batch 8, lr 0.05) on the MLP, in numpy: the same code both sides
    run (Flower's environment has no torch)."""
    w1, b1, w2, b2 = (p.astype(np.float32, copy=True) for p in params)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    for start in range(0, len(y), 8):
        idx = order[start : start + 8]
        xb, yb = x[idx], y[idx]
        h = np.maximum(xb @ w1 + b1, 0.0)
        logits = h @ w2 + b2
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1.0
        g = p / len(yb)
        gw2, gb2 = h.T @ g, g.sum(axis=0)
        gh = (g @ w2.T) * (h > 0)
        gw1, gb1 = xb.T @ gh, gh.sum(axis=0)
        w1 -= 0.05 * gw1
        b1 -= 0.05 * gb1
        w2 -= 0.05 * gw2
        b2 -= 0.05 * gb2
    return [w1, b1, w2, b2]


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it (``/proc``)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    mine, grew = {root}, True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return mine


class RssSampler:
    """Samples RSS every ``every`` seconds in a thread: this process alone, or (``tree``)
    the sum over this process and all its descendants. ``peak`` in bytes."""

    def __init__(self, tree: bool, every: float = 0.05) -> None:
        self.tree = tree
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        pids = descendants(os.getpid()) if self.tree else {os.getpid()}
        return 1024 * sum(_status_kb(pid, "VmRSS:") for pid in pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
