"""A server process for the gRPC fault tests (checkpointing, resumable)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import fedhive as fl
from fedhive.server import RoundCallback


class SlowRounds(RoundCallback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_round_end(self, engine, record) -> None:
        print(f"round {record['round']} done", flush=True)
        time.sleep(self.seconds)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--history", default=None)
    args = parser.parse_args()
    strategy = fl.server.strategy.FedAvg(
        min_fit_clients=args.clients,
        min_available_clients=args.clients,
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(4, np.float32)]),
        evaluate_fn=lambda rnd, params, cfg: (float(params[0].mean()), {}),
    )
    history = fl.server.start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=fl.server.ServerConfig(num_rounds=args.rounds, round_timeout=20),
        strategy=strategy,
        seed=5,
        checkpoint_dir=args.checkpoint,
        resume=args.resume,
        callbacks=[SlowRounds(args.pause)],
    )
    if args.history:
        with open(args.history, "w") as fh:
            json.dump(history.to_dict(), fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
