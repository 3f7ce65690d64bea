"""A DP server process that dies (``os._exit``) at a chosen point of a chosen round.

Every model the server lets out is logged first, to ``--releases`` (one line per
evaluation: round, sha256 of the model's bytes, its mean), flushed and fsynced: that log
is what the world saw. The crash points, in the order a round passes them:

    aggregated       the new model exists in memory only (before the release checkpoint)
    release-written  the release checkpoint is on disk, LATEST not yet switched to it
    released         LATEST names the release checkpoint; evaluation has not begun
    evaluated        evaluation is done (and logged); the round's checkpoint is not written
    saved-unswitched the round's checkpoint is on disk, LATEST not yet switched to it
    saved            the round is complete (checkpoint and LATEST); callbacks run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

import fedhive as fl
import fedhive.server.checkpoint as checkpoint_module
from fedhive.privacy import DifferentialPrivacyServerSideFixedClipping
from fedhive.server import RoundCallback
from fedhive.server.checkpoint import Checkpointer

CRASH_CODE = 17


def die() -> None:
    sys.stdout.flush()
    os._exit(CRASH_CODE)


def arm(point: str, rnd: int) -> None:
    """Patch the checkpoint module so that the process dies at ``point`` of round ``rnd``."""
    if point == "aggregated":
        release = Checkpointer.release

        def dying_release(self, engine, pending):
            if engine.current_round == rnd:
                die()
            return release(self, engine, pending)

        Checkpointer.release = dying_release  # type: ignore[method-assign]
    elif point in ("release-written", "saved-unswitched"):
        name = f"round-{rnd:06d}" + ("-released" if point == "release-written" else "")
        write = checkpoint_module.atomic_write_bytes

        def dying_write(path, data, *args, **kwargs):
            if os.path.basename(path) == "LATEST" and data == name.encode():
                die()
            return write(path, data, *args, **kwargs)

        checkpoint_module.atomic_write_bytes = dying_write
    elif point == "evaluated":
        save = Checkpointer.save

        def dying_save(self, engine):
            if engine.current_round == rnd:
                die()
            return save(self, engine)

        Checkpointer.save = dying_save  # type: ignore[method-assign]


class DieAfterRound(RoundCallback):
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def on_round_end(self, engine, record) -> None:
        print(f"round {record['round']} done", flush=True)
        if record["round"] == self.rnd:
            die()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--releases", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--crash", default=None)
    parser.add_argument("--crash-round", type=int, default=2)
    parser.add_argument("--history", default=None)
    args = parser.parse_args()

    def evaluate_fn(rnd, arrays, config):
        if args.crash == "released" and rnd == args.crash_round:
            die()
        model = np.concatenate([np.asarray(a).ravel() for a in arrays])
        digest = hashlib.sha256(model.tobytes()).hexdigest()
        with open(args.releases, "a") as fh:
            fh.write(json.dumps({"round": rnd, "sha256": digest, "mean": float(model.mean())}))
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        return float(model.mean()), {}

    inner = fl.server.strategy.FedAvg(
        min_fit_clients=2,
        min_available_clients=2,
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(4, np.float32)]),
        evaluate_fn=evaluate_fn,
    )
    strategy = DifferentialPrivacyServerSideFixedClipping(
        inner, noise_multiplier=1.0, clipping_norm=10.0, num_sampled_clients=2
    )  # secure noise: a round run twice releases two different models
    callbacks = []
    if args.crash is not None:
        arm(args.crash, args.crash_round)
        if args.crash == "saved":
            callbacks.append(DieAfterRound(args.crash_round))
    history = fl.server.start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=fl.server.ServerConfig(num_rounds=args.rounds, round_timeout=20),
        strategy=strategy,
        seed=5,
        checkpoint_dir=args.checkpoint,
        resume=args.resume,
        callbacks=callbacks,
    )
    if args.history:
        with open(args.history, "w") as fh:
            json.dump(history.to_dict(), fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
