"""Update compression: bytes to accuracy, codec throughput, round time on a slow link.

1. Bytes to accuracy. MNIST-1D (Greydanus 2020), Dirichlet(0.5) over clients, the default
   CNN1D, FedAvg; every codec with and without error feedback next to no compression, all
   in the same run and on the same seeds. Reported per setting: mean final test accuracy
   over the seeds, its gap to no compression at equal rounds (points), uplink bytes as
   counted on the wire (History ``bytes_up``: fit and evaluate replies), the ratio of the
   uncompressed run's uplink bytes to this one's, and the uplink bytes until the run first
   reached the uncompressed run's final accuracy ("-" if never).
2. Throughput: encode and decode of a 100 MB float32 update (MB/s), next to
   ``numpy.copy`` of the same array in the same run (best of 3).
3. Round time on a bandwidth-limited link: the in-process transport with a simulated
   cap (each message waits ``bytes / bandwidth``), a plain round next to a compressed
   one, same clients and seed.

Run::

    nice -n 10 .venv/bin/python benchmarks/compression.py             # 3 seeds
    nice -n 10 .venv/bin/python benchmarks/compression.py --quick     # smoke run
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Any

import numpy as np

from fedhive.cli.config import validate
from fedhive.cli.experiment import build_experiment
from fedhive.compression import BF16, EDEN, FP16, QSGD, Codec, RandomK, Sign, TopK
from fedhive.server.config import ServerConfig
from fedhive.simulation import start_simulation
from fedhive.transport.codec import encode_message


def codecs(error_feedback: bool) -> list[Codec]:
    ef = {"error_feedback": error_feedback, "min_size": 0}
    return [
        FP16(**ef),
        BF16(**ef),
        QSGD(bits=4, **ef),
        TopK(ratio=0.01, **ef),
        RandomK(ratio=0.1, **ef),
        Sign(**ef),
        EDEN(bits=1, **ef),
    ]


def label(codec: Codec | None) -> str:
    if codec is None:
        return "none"
    params = {k: v for k, v in codec.params().items() if k not in ("error_feedback", "min_size")}
    inner = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{codec.id}({inner}){' +EF' if codec.error_feedback else ''}".replace(
        ",shared_seed=False", ""
    )


def experiment(seed: int, args: argparse.Namespace) -> Any:
    cfg = validate(
        {
            "seed": seed,
            "rounds": args.rounds,
            "num_clients": args.clients,
            "data": {"dataset": "mnist1d", "num_samples": args.samples, "alpha": 0.5},
            "model": {"name": "cnn1d"},
            "train": {
                "local_epochs": args.epochs,
                "batch_size": args.batch,
                "lr": args.lr,
                "momentum": 0.9,
            },
            "strategy": {"fraction_fit": args.fraction, "fraction_evaluate": 0.0},
        }
    )
    return build_experiment(cfg)


def one_run(exp: Any, codec: Codec | None, seed: int, rounds: int) -> dict[str, Any]:
    history = start_simulation(
        client_fn=exp.client_fn,
        num_clients=exp.cfg.num_clients,
        config=ServerConfig(num_rounds=rounds),
        strategy=exp.strategy,
        seed=seed,
        num_workers=1,
        compression=codec,
    )
    rounds_ = [r for r in history.rounds if r["round"] > 0]
    return {
        "acc": [r["centralized"]["accuracy"] for r in rounds_],
        "up": [r["bytes_up"] for r in rounds_],
    }


def bytes_to(acc: list[float], up: list[int], target: float) -> int | None:
    total = 0
    for a, b in zip(acc, up, strict=True):
        total += b
        if a >= target:
            return total
    return None


def accuracy_table(args: argparse.Namespace) -> list[str]:
    settings: list[Codec | None] = [None, *codecs(False), *codecs(True)]
    if args.subset:
        settings = [c for c in settings if c is None or c.id in ("topk", "eden")]
    results: dict[str, list[dict[str, Any]]] = {label(c): [] for c in settings}
    for seed in range(args.seeds):
        for codec in settings:
            start = time.perf_counter()
            exp = experiment(seed, args)  # a fresh strategy: it hands its initial model out once
            results[label(codec)].append(one_run(exp, codec, seed, args.rounds))
            print(
                f"  seed {seed} {label(codec)}: {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    base = results["none"]
    base_acc = statistics.mean(r["acc"][-1] for r in base)
    base_up = statistics.mean(sum(r["up"]) for r in base)
    lines = [
        f"{'setting':28} {'final acc':>9} {'gap (pt)':>8} {'uplink MB':>10} {'x fewer':>8} "
        f"{'MB to base acc':>14}"
    ]
    for name, runs in results.items():
        acc = statistics.mean(r["acc"][-1] for r in runs)
        up = statistics.mean(sum(r["up"]) for r in runs)
        reach = [bytes_to(r["acc"], r["up"], b["acc"][-1]) for r, b in zip(runs, base, strict=True)]
        hit = [x for x in reach if x is not None]
        to = f"{statistics.mean(hit) / 1e6:.3f} ({len(hit)}/{len(runs)})" if hit else "-"
        lines.append(
            f"{name:28} {acc:9.4f} {100 * (acc - base_acc):+8.2f} {up / 1e6:10.3f} "
            f"{base_up / up:8.1f} {to:>14}"
        )
    return lines


def best_of(fn: Any, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def throughput_table(megabytes: int) -> list[str]:
    n = megabytes * (1 << 20) // 4
    x = np.random.default_rng(0).normal(scale=0.01, size=n).astype(np.float32)
    mb = x.nbytes / 1e6
    copy = best_of(lambda: np.copy(x))
    lines = [
        f"numpy.copy of {mb:.0f} MB: {mb / copy:.0f} MB/s",
        f"{'codec':22} {'encode MB/s':>11} {'x copy':>7} {'decode MB/s':>11} {'x copy':>7} "
        f"{'wire ratio':>10}",
    ]
    for codec in [
        FP16(),
        BF16(),
        QSGD(bits=4),
        QSGD(bits=4, block=4096),
        Sign(),
        EDEN(bits=1),
        EDEN(bits=4),
        TopK(ratio=0.01),
        RandomK(ratio=0.01),
        RandomK(ratio=0.01, shared_seed=True),
    ]:
        rng = np.random.default_rng(1)
        box: dict[str, Any] = {}

        def enc(codec: Codec = codec, rng: Any = rng, box: dict[str, Any] = box) -> None:
            box["e"] = codec.encode(x, [n], rng, 3)

        te = best_of(enc, 2)
        arrays, info = box["e"]
        td = best_of(lambda c=codec, a=arrays, i=info: c.decode(a, i, [n], 3), 2)
        size = sum(a.nbytes for a in arrays.values())
        lines.append(
            f"{label(codec):22} {mb / te:11.0f} {copy / te:7.2f} {mb / td:11.0f} "
            f"{copy / td:7.2f} {x.nbytes / size:10.1f}"
        )
        del box["e"]
    return lines


def round_time_table(args: argparse.Namespace) -> list[str]:
    """Rounds on a link of ``args.bandwidth`` MB/s: each task and reply waits its wire
    size over the bandwidth (simulated on the in-process transport's latency hook)."""
    bandwidth = args.bandwidth * 1e6
    shared: dict[str, int] = {}

    def link(task: Any) -> float:
        key = id(task.content)
        if key not in shared:
            shared.clear()
            shared[key] = len(encode_message(task))
        return shared[key] / bandwidth

    lines = [
        f"link {args.bandwidth} MB/s per client (download time of the task + upload of "
        "the reply), 3 rounds"
    ]
    lines.append(f"{'setting':28} {'s per round':>11} {'speed-up':>8} {'up bytes/client':>15}")
    base = None
    for codec in [
        None,
        TopK(ratio=0.01, error_feedback=True, min_size=0),
        EDEN(bits=1, error_feedback=True, min_size=0),
        QSGD(bits=4, min_size=0),
    ]:

        class Slow:
            """Sleeps each reply's own upload time on top of the task's download."""

            def __call__(self, message: Any, context: Any, call_next: Any) -> Any:
                time.sleep(link(message))
                reply = call_next(message, context)
                time.sleep(len(encode_message(reply)) / bandwidth)
                return reply

        from fedhive.compression import compression_mod

        exp = experiment(0, args)
        start = time.perf_counter()
        history = start_simulation(
            client_fn=exp.client_fn,
            num_clients=exp.cfg.num_clients,
            config=ServerConfig(num_rounds=3),
            strategy=exp.strategy,
            seed=0,
            num_workers=1,
            compression=codec,
            mods=[Slow(), compression_mod] if codec is not None else [Slow()],
        )
        per_round = (time.perf_counter() - start) / 3
        base = base or per_round
        rounds = [r for r in history.rounds if r["round"] > 0]
        per_client = statistics.mean(c["up"] for r in rounds for c in r["bytes_clients"].values())
        lines.append(
            f"{label(codec):28} {per_round:11.2f} {base / per_round:8.2f} {per_client:15.0f}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--bandwidth", type=float, default=0.1, help="MB/s per client link")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--subset", action="store_true", help="1-bit codecs and top-k only")
    parser.add_argument(
        "--parts", default="1,2,3", help="which parts to run: 1 accuracy, 2 speed, 3 link"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.clients, args.samples, args.megabytes = 1, 2, 8, 1000, 8
        args.subset = True
    out = ["fedhive compression benchmark", "command: " + shlex.join(["python", *sys.argv]), ""]
    parts = set(args.parts.split(","))
    if "1" in parts:
        out.append(
            f"1. bytes to accuracy: MNIST-1D ({args.samples} samples), Dirichlet(0.5), "
            f"{args.clients} clients, {args.fraction} per round, CNN1D, {args.rounds} rounds, "
            f"{args.seeds} seeds, local epochs {args.epochs}, batch {args.batch}, lr {args.lr}; "
            "min_size=0 (every array compressed)"
        )
        out += accuracy_table(args)
    if "2" in parts:
        out += ["", "2. throughput (single thread)", *throughput_table(args.megabytes)]
    if "3" in parts:
        out += ["", "3. round time on a bandwidth-limited in-process link"]
        out += round_time_table(args)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
