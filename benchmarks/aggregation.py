"""Aggregation: FedAvg's streaming fold, as the engine runs it, against a hand-written fold.

The fedhive path does per round what ``default_fit_workflow`` does: ``fit_aggregator``,
then for every reply the engine's own ``fold_fit_reply`` (``check_fit_reply`` and then
``aggregator.add``), then ``finalize``. The hand-written path is a streaming numpy fold
doing the same work: a finite check on each update, a float64 accumulator weighted by
``num_examples``, a final divide and a cast back to float32.

Updates come from a pool of 4 distinct pre-generated models that both paths cycle
through, so generating them costs nothing inside either measurement and the benchmark
holds O(model). Time is the median of the repetitions; peak extra memory is measured
with tracemalloc (which tracks numpy's allocations) in a separate run of each path.

Run::

    .venv/bin/python benchmarks/aggregation.py          # 100 clients x 1M float32
    .venv/bin/python benchmarks/aggregation.py --quick  # 10 clients x 100k, a few seconds
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from fedhive.common.message import Message, MessageType
from fedhive.common.records import FitRes, NDArrays, Status, ndarrays_to_parameters
from fedhive.common.records import parameters_to_ndarrays as to_arrays
from fedhive.server.engine import Engine, RoundDriver, fold_fit_reply
from fedhive.server.strategy import FedAvg
from fedhive.transport.inprocess import InProcessTransport

TARGET_RATIO = 1.2
POOL_SIZE = 4
MB = 1e6

Fold = Callable[[NDArrays, list[NDArrays], int], NDArrays]


def make_pool(num_params: int, seed: int = 0) -> tuple[NDArrays, list[NDArrays]]:
    """(global model, POOL_SIZE distinct updates), each two float32 layers."""
    rows = max(1, num_params * 6 // 10 // 1000)
    first = (rows, num_params * 6 // 10 // rows)
    shapes = [first, (num_params - first[0] * first[1],)]
    rng = np.random.default_rng(seed)
    model = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    pool = [
        [(layer + 0.01 * (k + 1)).astype(np.float32) for layer in model] for k in range(POOL_SIZE)
    ]
    return model, pool


def num_examples(index: int) -> int:
    return 10 + index % 17


def fold_fedhive(model: NDArrays, pool: list[NDArrays], clients: int) -> NDArrays:
    """What the engine does with one round's fit replies (default_fit_workflow)."""
    strategy = FedAvg(fraction_evaluate=0.0)
    engine = Engine(strategy=strategy, transport=InProcessTransport(lambda task: task))
    engine.parameters = ndarrays_to_parameters(model)
    driver = RoundDriver(engine, 1)
    aggregator = strategy.fit_aggregator(1, engine.parameters)
    reference = to_arrays(engine.parameters)
    for i in range(clients):
        task = Message.task(
            run_id=0,
            node_id=str(i),
            server_round=1,
            model_version=0,
            message_type=MessageType.FIT,
            content=None,
        )
        res = FitRes(Status(), ndarrays_to_parameters(pool[i % POOL_SIZE]), num_examples(i), {})
        failure = fold_fit_reply(driver, task.reply(res), aggregator, reference)
        if failure is not None:
            raise failure
    params, _ = aggregator.finalize()
    assert params is not None
    return to_arrays(params)


def fold_by_hand(model: NDArrays, pool: list[NDArrays], clients: int) -> NDArrays:
    """A streaming numpy fold: finite check, float64 weighted sum, divide, cast."""
    acc = [np.zeros(layer.shape, dtype=np.float64) for layer in model]
    scratch = np.empty(max(layer.size for layer in model), dtype=np.float64)
    total = 0.0
    for i in range(clients):
        update = pool[i % POOL_SIZE]
        weight = float(num_examples(i))
        for layer in update:
            if not np.isfinite(layer).all():
                raise ValueError(f"client {i} sent NaN or Inf")
        for a, layer in zip(acc, update, strict=True):
            buf = scratch[: layer.size].reshape(layer.shape)
            np.multiply(layer, weight, out=buf, dtype=np.float64)
            np.add(a, buf, out=a)
        total += weight
    out = []
    for a, layer in zip(acc, model, strict=True):
        np.divide(a, total, out=a)
        out.append(a.astype(layer.dtype))
    return out


def time_fold(fold: Fold, model: NDArrays, pool: list[NDArrays], clients: int) -> float:
    start = time.perf_counter()
    fold(model, pool, clients)
    return time.perf_counter() - start


def peak_extra_bytes(fold: Fold, model: NDArrays, pool: list[NDArrays], clients: int) -> int:
    """Peak bytes allocated above what was live before the fold (result included)."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = fold(model, pool, clients)
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return peak - before


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 clients x 100k")
    parser.add_argument("--clients", type=int, default=None, help="default 100 (--quick: 10)")
    parser.add_argument("--params", type=int, default=None, help="default 1M (--quick: 100k)")
    parser.add_argument("--reps", type=int, default=None, help="default 5 (--quick: 3)")
    args = parser.parse_args(argv)
    clients = args.clients or (10 if args.quick else 100)
    num_params = args.params or (100_000 if args.quick else 1_000_000)
    reps = args.reps or (3 if args.quick else 5)

    model, pool = make_pool(num_params)
    model_bytes = sum(layer.nbytes for layer in model)
    paths: dict[str, Fold] = {
        "fedhive FedAvg (engine fold)": fold_fedhive,
        "hand-written numpy fold": fold_by_hand,
    }
    for fold in paths.values():  # warm-up
        fold(model, pool, min(clients, 2))
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(reps):
        for name, fold in paths.items():
            times[name].append(time_fold(fold, model, pool, clients))
    peaks = {name: peak_extra_bytes(fold, model, pool, clients) for name, fold in paths.items()}
    results = {name: fold(model, pool, clients) for name, fold in paths.items()}

    ours_name, hand_name = paths
    ours, theirs = statistics.median(times[ours_name]), statistics.median(times[hand_name])
    rows = []
    for name in paths:
        med = statistics.median(times[name])
        ratio = med / theirs
        is_ours = name == ours_name
        status = ("ok" if ratio <= TARGET_RATIO else "ABOVE TARGET") if is_ours else "-"
        rows.append(
            [
                name,
                f"{med * 1e3:.1f}",
                f"{min(times[name]) * 1e3:.1f}",
                f"{med * 1e3 / clients:.2f}",
                f"{ratio:.2f}x",
                f"<= {TARGET_RATIO}x" if is_ours else "-",
                f"{peaks[name] / MB:.1f}",
                f"{peaks[name] / model_bytes:.2f}x",
                status,
            ]
        )
    a, b = results.values()
    diff = max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True))
    shapes = " + ".join(str(layer.shape) for layer in model)
    print(f"Aggregation: {clients} clients x {num_params:,} float32 params ({shapes}),")
    print(f"model {model_bytes / MB:.1f} MB; time = median of {reps} repetitions\n")
    headers = [
        "path",
        "median ms",
        "min ms",
        "ms/client",
        "ratio",
        "target",
        "peak extra MB",
        "x model",
        "status",
    ]
    print(table(headers, rows))
    print(f"\nfedhive / hand-written time ratio: {ours / theirs:.2f}x (target <= {TARGET_RATIO}x)")
    print("peak memory target: O(model), independent of the number of clients")
    same = "identical" if diff == 0.0 else "DIFFERENT"
    print(f"results {same}: max abs diff = {diff:.3g}")
    print(f"\nReproduce: {shlex.join(['.venv/bin/python', *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
