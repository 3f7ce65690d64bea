"""Update compression: bytes to accuracy, codec throughput, round time on a slow link.

1. Bytes to accuracy. MNIST-1D (Greydanus 2020), Dirichlet(0.5) over clients, the default
   CNN1D, FedAvg; every codec with and without error feedback next to no compression, all
   in the same run and on the same seeds. Reported per setting: mean final test accuracy
   over the seeds, its gap to no compression at equal rounds (points), uplink bytes as
   counted on the wire (History ``bytes_up``: fit and evaluate replies), the ratio of the
   uncompressed run's uplink bytes to this one's, and the uplink bytes until the run first
   reached the uncompressed run's final accuracy ("-" if never). ``--runs`` names the
   settings (each with its own client lr and FedAvgM server lr/momentum if wanted);
   ``--split val`` scores on the clients' pooled held-out data instead of the test
   split, to choose settings without looking at the test split.
2. Throughput: encode and decode of a 100 MB float32 update (MB/s, single thread, CPU
   time), each next to a ``numpy.copy`` of the same array: interleaved (copy, encode,
   decode) triples, medians. ``--baseline-src DIR`` runs this part a second time with
   the package imported from another source tree (an older commit), alternating, so
   the two implementations are compared side by side on the same machine state.
3. Round time on a bandwidth-limited link: the in-process transport with a simulated
   cap (each message waits ``bytes / bandwidth``), a plain round next to a compressed
   one, same clients and seed.

Run::

    nice -n 10 .venv/bin/python benchmarks/compression.py             # 3 seeds
    nice -n 10 .venv/bin/python benchmarks/compression.py --quick     # smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # single-thread throughput (EDEN's matmuls)

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhive.cli.config import validate
from fedhive.cli.experiment import build_experiment, evaluate_params
from fedhive.compression import (
    BF16,
    EDEN,
    FP16,
    QSGD,
    Codec,
    Compression,
    RandomK,
    Sign,
    TopK,
    _kernels,
)
from fedhive.compression.codecs import codec_from_params
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
        EDEN(bits=1, ratio=0.7, **ef),  # EDEN below one bit: 0.7 bits per coordinate
        EDEN(bits=1, ratio=0.45, **ef),
    ]


def label(codec: Codec | None) -> str:
    if codec is None:
        return "none"
    params = {k: v for k, v in codec.params().items() if k not in ("error_feedback", "min_size")}
    inner = ",".join(f"{k}={v}" for k, v in params.items())
    return (
        f"{codec.id}({inner}){' +EF' if codec.error_feedback else ''}".replace(
            ",shared_seed=False", ""
        )
    ).replace(",ratio=1.0", "")


@dataclass(frozen=True)
class Tune:
    """A setting's own step sizes: the clients' lr (None: ``--lr``) and the server's
    (FedAvgM's server lr and momentum; 1 and 0 are FedAvg)."""

    lr: float | None = None
    server_lr: float = 1.0
    server_momentum: float = 0.0

    def suffix(self) -> str:
        out = "" if self.lr is None else f" lr={self.lr:g}"
        if self.server_lr != 1.0 or self.server_momentum != 0.0:
            out += f" slr={self.server_lr:g} smom={self.server_momentum:g}"
        return out


Setting = tuple[Codec | None, Tune]


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_setting(spec: str) -> Setting:
    """``CODEC[:key=value,...][+ef][@lr=..,slr=..,smom=..]`` (``none`` for no codec), e.g.
    ``eden:bits=1,ratio=0.85+ef@lr=0.08``; every array compressed (``min_size=0``)."""
    spec, _, tuning = spec.strip().partition("@")
    ef = spec.endswith("+ef")
    spec = spec.removesuffix("+ef")
    codec_id, _, params = spec.partition(":")
    kv = dict(item.split("=", 1) for item in params.split(",") if item)
    tv = {k: float(v) for k, v in (item.split("=", 1) for item in tuning.split(",") if item)}
    tune = Tune(tv.pop("lr", None), tv.pop("slr", 1.0), tv.pop("smom", 0.0))
    if tv:
        raise SystemExit(f"unknown tuning keys {sorted(tv)} in {spec!r}: lr, slr, smom")
    if codec_id == "none":
        return None, tune
    params_ = {k: _number(v) for k, v in kv.items()}
    return codec_from_params(codec_id, {**params_, "error_feedback": ef, "min_size": 0}), tune


def setting_label(setting: Setting) -> str:
    return label(setting[0]) + setting[1].suffix()


def experiment(seed: int, args: argparse.Namespace, tune: Tune | None = None) -> Any:
    """The run's experiment; ``tune`` overrides the client lr and sets FedAvgM's server lr
    and momentum. With ``--split val`` the server scores the model on the clients' pooled
    held-out data (``data.val_fraction`` of each client, never trained on) instead of the
    test split: the split settings are chosen on."""
    tune = tune or Tune()
    strategy: dict[str, Any] = {"fraction_fit": args.fraction, "fraction_evaluate": 0.0}
    if tune.server_lr != 1.0 or tune.server_momentum != 0.0:
        strategy |= {
            "name": "fedavgm",
            "server_learning_rate": tune.server_lr,
            "server_momentum": tune.server_momentum,
        }
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
                "lr": args.lr if tune.lr is None else tune.lr,
                "momentum": 0.9,
            },
            "strategy": strategy,
        }
    )
    exp = build_experiment(cfg)
    if args.split == "val":
        held_out = np.concatenate([val for _, val in exp.client_fn.splits])
        x, y, spec = (
            exp.dataset.x_train[held_out],
            exp.dataset.y_train[held_out],
            exp.client_fn.spec,
        )

        def on_validation(rnd: int, params: Any, config: Any) -> tuple[float, dict[str, Any]]:
            loss, acc = evaluate_params(spec, params, x, y)
            return loss, {"accuracy": acc}

        exp.strategy.evaluate_fn = on_validation
    return exp


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
    settings: list[Setting] = [(c, Tune()) for c in [None, *codecs(False), *codecs(True)]]
    if args.subset:
        settings = [s for s in settings if s[0] is None or s[0].id in ("topk", "eden")]
    if args.ids:
        settings = [s for s in settings if s[0] is None or s[0].id in args.ids.split(",")]
    if args.settings:
        settings = [s for s in settings if s[0] is None or label(s[0]) in args.settings.split(";")]
    if args.runs:  # the baseline "none" first, then these
        settings = [(None, Tune()), *(parse_setting(x) for x in args.runs.split(";"))]
    results: dict[str, list[dict[str, Any]]] = {setting_label(s): [] for s in settings}
    for seed in range(args.seed0, args.seed0 + args.seeds):
        for codec, tune in settings:
            start = time.perf_counter()
            exp = experiment(seed, args, tune)  # a fresh strategy: it hands its model out once
            name = setting_label((codec, tune))
            results[name].append(one_run(exp, codec, seed, args.rounds))
            print(
                f"  seed {seed} {name}: {time.perf_counter() - start:.1f} s, "
                f"acc {results[name][-1]['acc'][-1]:.4f}",
                file=sys.stderr,
                flush=True,
            )
    base = results["none"]
    base_acc = statistics.mean(r["acc"][-1] for r in base)
    base_up = statistics.mean(sum(r["up"]) for r in base)
    lines = [
        f"{'setting':48} {'final acc':>9} {'gap (pt)':>8} {'uplink MB':>10} {'x fewer':>8} "
        f"{'MB to base acc':>14}  gap per seed (pt)"
    ]
    for name, runs in results.items():
        acc = statistics.mean(r["acc"][-1] for r in runs)
        up = statistics.mean(sum(r["up"]) for r in runs)
        reach = [bytes_to(r["acc"], r["up"], b["acc"][-1]) for r, b in zip(runs, base, strict=True)]
        hit = [x for x in reach if x is not None]
        to = f"{statistics.mean(hit) / 1e6:.3f} ({len(hit)}/{len(runs)})" if hit else "-"
        per_seed = " ".join(
            f"{100 * (r['acc'][-1] - b['acc'][-1]):+.2f}" for r, b in zip(runs, base, strict=True)
        )
        lines.append(
            f"{name:48} {acc:9.4f} {100 * (acc - base_acc):+8.2f} {up / 1e6:10.3f} "
            f"{base_up / up:8.1f} {to:>14}  {per_seed}"
        )
    return lines


def cpu_seconds(fn: Any) -> float:
    """CPU time (user + system, this process) of one call: steadier than wall time on a
    shared machine."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def throughput_codecs() -> list[Codec]:
    return [
        FP16(),
        BF16(),
        QSGD(bits=4),
        QSGD(bits=4, block=4096),
        QSGD(bits=8, scale=0.05),
        Sign(),
        EDEN(bits=1),
        EDEN(bits=2),
        EDEN(bits=4),
        TopK(ratio=0.01),
        RandomK(ratio=0.01),
        RandomK(ratio=0.01, shared_seed=True),
    ]


def throughput_samples(megabytes: int, repeat: int) -> dict[str, Any]:
    """Encode and decode of one ``megabytes`` float32 update, each timed next to a
    ``numpy.copy`` of the same array: ``repeat`` interleaved (copy, encode, decode)
    triples per codec. CPU seconds and per-triple ratios to the copy, by codec label."""
    n = megabytes * (1 << 20) // 4
    x = np.random.default_rng(0).normal(scale=0.01, size=n).astype(np.float32)
    out: dict[str, Any] = {"mb": x.nbytes / 1e6, "copy": [], "codecs": {}}
    built = getattr(_kernels, "compiled", lambda: False)()  # an older tree has no such test
    out["kernels"] = "compiled (fedhive.compression._ckernels)" if built else "numpy"
    for codec in throughput_codecs():
        row: dict[str, list[float]] = {"enc": [], "dec": [], "enc_x": [], "dec_x": [], "wire": []}
        for i in range(repeat):
            rng = np.random.default_rng(i)
            box: dict[str, Any] = {}
            c = cpu_seconds(lambda: np.copy(x))
            te = cpu_seconds(
                lambda c=codec, r=rng, b=box: b.setdefault("e", c.encode(x, [n], r, 3))
            )
            arrays, info = box.pop("e")
            td = cpu_seconds(lambda c=codec, a=arrays, i=info: c.decode(a, i, [n], 3))
            row["wire"].append(x.nbytes / sum(a.nbytes for a in arrays.values()))
            del arrays
            out["copy"].append(c)
            row["enc"].append(te)
            row["dec"].append(td)
            row["enc_x"].append(c / te)
            row["dec_x"].append(c / td)
        out["codecs"][label(codec)] = row
    return out


def throughput_table(samples: dict[str, Any]) -> list[str]:
    med = statistics.median
    mb = samples["mb"]
    lines = [
        f"numpy.copy of {mb:.0f} MB: {mb / med(samples['copy']):.0f} MB/s (median of "
        f"{len(samples['copy'])}, CPU time); 'x copy': median of the per-triple ratios; "
        f"kernels: {samples.get('kernels', 'numpy')}",
        f"{'codec':36} {'encode MB/s':>11} {'x copy':>7} {'decode MB/s':>11} {'x copy':>7} "
        f"{'wire ratio':>10}",
    ]
    for name, row in samples["codecs"].items():
        lines.append(
            f"{name:36} {mb / med(row['enc']):11.0f} {med(row['enc_x']):7.2f} "
            f"{mb / med(row['dec']):11.0f} {med(row['dec_x']):7.2f} {med(row['wire']):10.1f}"
        )
    return lines


def _merge_samples(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"mb": runs[0]["mb"], "copy": [], "codecs": {}}
    out["kernels"] = runs[0].get("kernels", "numpy")
    for run in runs:
        out["copy"] += run["copy"]
        for name, row in run["codecs"].items():
            into = out["codecs"].setdefault(name, {k: [] for k in row})
            for k, v in row.items():
                into[k] += v
    return out


def throughput_before_after(args: argparse.Namespace) -> list[str]:
    """Part 2 for the package at ``args.baseline_src`` and for this one, in alternating
    child processes (``rounds`` each), then both tables and the after/before ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    for _ in range(args.rounds_ab):
        for name, src in (("before", args.baseline_src), ("after", here)):
            env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
            cmd = [sys.executable, os.path.abspath(__file__), "--parts", "2", "--emit-json"]
            cmd += ["--megabytes", str(args.megabytes), "--repeat", str(args.repeat)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    before, after = _merge_samples(runs["before"]), _merge_samples(runs["after"])
    med = statistics.median
    lines = [f"before: the package from {args.baseline_src}", *throughput_table(before), ""]
    lines += ["after: this tree", *throughput_table(after), ""]
    lines.append(f"{'codec':36} {'encode after/before':>19} {'decode after/before':>19}")
    for name, row in after["codecs"].items():
        old = before["codecs"].get(name)
        if old is None:
            continue
        lines.append(
            f"{name:36} {med(old['enc']) / med(row['enc']):19.2f} "
            f"{med(old['dec']) / med(row['dec']):19.2f}"
        )
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
        "the reply), 3 rounds, one worker (clients in turn, so link times add up)",
        "link s: time on the link per round; expected: the plain round with this link time "
        "instead of its own; the rest (measured - expected) is the codec's own time "
        "(encode, decode, error feedback)",
    ]
    lines.append(
        f"{'setting':58} {'s per round':>11} {'speed-up':>8} {'up bytes/client':>15} "
        f"{'down bytes/client':>17} "
        f"{'link s':>7} {'expected':>8} {'codec s':>7}"
    )
    base: tuple[float, float] | None = None
    for i, codec in enumerate(
        [
            None,  # a warm-up (first model, data and thread start), not reported
            None,
            TopK(ratio=0.01, error_feedback=True, min_size=0),
            EDEN(bits=1, error_feedback=True, min_size=0),
            QSGD(bits=4, min_size=0),
            # the broadcast model compressed too: its download was most of the link time
            Compression(
                uplink=EDEN(bits=1, error_feedback=True, min_size=0),
                downlink=QSGD(bits=8, min_size=0),
                server_error_feedback=True,
            ),
            Compression(
                uplink=EDEN(bits=1, error_feedback=True, min_size=0),
                downlink=QSGD(bits=4, block=4096, min_size=0),
                server_error_feedback=True,
            ),
        ]
    ):

        class Slow:
            """Sleeps each reply's own upload time on top of the task's download."""

            waited = 0.0

            def __call__(self, message: Any, context: Any, call_next: Any) -> Any:
                down = link(message)
                time.sleep(down)
                reply = call_next(message, context)
                up = len(encode_message(reply)) / bandwidth
                time.sleep(up)
                Slow.waited += down + up
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
        on_link = Slow.waited / 3
        if i == 0:
            continue
        base = base or (per_round, on_link)
        expected = base[0] - base[1] + on_link
        rounds = [r for r in history.rounds if r["round"] > 0]
        clients = [c for r in rounds for c in r["bytes_clients"].values()]
        per_client = statistics.mean(c["up"] for c in clients)
        down = statistics.mean(c["down"] for c in clients)
        name = label(codec) if not isinstance(codec, Compression) else label(codec.uplink)
        if isinstance(codec, Compression) and codec.downlink is not None:
            name += f", down {label(codec.downlink)}"
        lines.append(
            f"{name:58} {per_round:11.2f} {base[0] / per_round:8.2f} {per_client:15.0f} "
            f"{down:17.0f} "
            f"{on_link:7.2f} {expected:8.2f} {per_round - expected:7.2f}"
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
    parser.add_argument("--repeat", type=int, default=5, help="throughput triples per codec")
    parser.add_argument(
        "--baseline-src", default="", help="part 2 also for the package in this source tree"
    )
    parser.add_argument("--rounds-ab", type=int, default=2, help="alternations with --baseline-src")
    parser.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=float, default=0.1, help="MB/s per client link")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--subset", action="store_true", help="1-bit codecs and top-k only")
    parser.add_argument("--ids", default="", help="part 1 for these codec ids only (topk,eden)")
    parser.add_argument("--settings", default="", help="part 1 for these labels only (a;b)")
    parser.add_argument(
        "--runs",
        default="",
        help="part 1 for 'none' and these settings (a;b), each "
        "CODEC[:key=value,...][+ef][@lr=..,slr=..,smom=..], e.g. eden:bits=1,ratio=0.85+ef@lr=0.08",
    )
    parser.add_argument(
        "--seed0", type=int, default=0, help="first seed (seeds seed0, seed0+1, ...)"
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="score on the test split, or on the clients' pooled held-out data (for tuning)",
    )
    parser.add_argument(
        "--parts", default="1,2,3", help="which parts to run: 1 accuracy, 2 speed, 3 link"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.clients, args.samples, args.megabytes = 1, 2, 8, 1000, 8
        args.repeat = 2
        args.subset = True
    out = ["fedhive compression benchmark", "command: " + shlex.join(["python", *sys.argv]), ""]
    parts = set(args.parts.split(","))
    if "1" in parts:
        out.append(
            f"1. bytes to accuracy: MNIST-1D ({args.samples} samples), Dirichlet(0.5), "
            f"{args.clients} clients, {args.fraction} per round, CNN1D, {args.rounds} rounds, "
            f"{args.seeds} seeds from {args.seed0}, local epochs {args.epochs}, "
            f"batch {args.batch}, lr {args.lr}; min_size=0 (every array compressed); scored on the "
            f"{'test split' if args.split == 'test' else 'clients held-out data (validation)'}"
        )
        out += accuracy_table(args)
    if "2" in parts and args.emit_json:
        print(json.dumps(throughput_samples(args.megabytes, args.repeat)))
        return 0
    if "2" in parts:
        out += ["", "2. throughput (single thread)"]
        if args.baseline_src:
            out += throughput_before_after(args)
        else:
            out += throughput_table(throughput_samples(args.megabytes, args.repeat))
    if "3" in parts:
        out += ["", "3. round time on a bandwidth-limited in-process link"]
        out += round_time_table(args)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
