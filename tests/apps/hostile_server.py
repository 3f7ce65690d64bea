"""A deployment server process for the hostile-input tests.

Prints ``listening PORT`` once serving; at the end writes ``--out`` (JSON): the history,
the transport's refusals, the final model (as lists) and memory figures in MiB.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

import fedhive as fl


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, _status_mib("VmRSS"))


_FINAL: list = []  # the global model after the last round


class _Keep(fl.server.RoundCallback):
    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause

    def on_round_end(self, engine, record) -> None:
        _FINAL[:] = [np.array(a) for a in engine.parameters.arrays]
        print(f"round {record['round']} done", flush=True)
        time.sleep(self.pause)  # a longer run: attackers join the rounds that follow


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--size", type=int, default=4, help="float32 model elements")
    parser.add_argument("--tokens", default=None, help="JSON file node -> token")
    parser.add_argument("--round-timeout", type=float, default=20.0)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--spill-bytes", type=int, default=64 << 20)
    parser.add_argument("--spill-dir", default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certs", default=None, help="directory of make_certificates files")
    parser.add_argument("--mtls", action="store_true")
    parser.add_argument("--hello-timeout", type=float, default=None)
    parser.add_argument("--max-handshakes", type=int, default=None)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds after each round")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tokens = json.loads(Path(args.tokens).read_text()) if args.tokens else None
    strategy = fl.server.strategy.FedAvg(
        min_fit_clients=args.clients,
        min_available_clients=args.clients,
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(args.size, np.float32)]),
    )
    holder = []

    def started(server) -> None:
        holder.append(server)
        if args.hello_timeout is not None:
            server.hello_timeout = args.hello_timeout
        if args.max_handshakes is not None:
            server.max_handshakes = args.max_handshakes
        print(f"listening {server.port}", flush=True)

    certificates = None
    if args.certs:
        d = Path(args.certs)
        names = ("ca.pem", "server.pem", "server_key.pem")
        certificates = tuple((d / f).read_bytes() for f in names)
    sampler = RssSampler()
    base = _status_mib("VmRSS")
    sampler.start()
    error = None
    history = None
    try:
        history = fl.server.start_server(
            server_address=f"127.0.0.1:{args.port}",
            config=fl.server.ServerConfig(num_rounds=args.rounds, round_timeout=args.round_timeout),
            strategy=strategy,
            seed=7,
            auth_tokens=tokens,
            certificates=certificates,
            require_client_auth=args.mtls,
            checkpoint_dir=args.checkpoint,
            spill_bytes=args.spill_bytes or None,
            spill_dir=args.spill_dir,
            wait_timeout=60,
            on_started=started,
            callbacks=[_Keep(args.pause)],
        )
    except fl.FedhiveError as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(error, file=sys.stderr, flush=True)
    sampler.stop.set()
    server = holder[0] if holder else None
    out = {
        "error": error,
        "history": history.to_dict() if history is not None else None,
        "refusals": list(getattr(server, "refusals", [])) if server else [],
        "refused": list(server.refused) if server else [],
        "model": [a.tobytes().hex() for a in _FINAL],
        "rss_base_mib": base,
        "rss_peak_mib": max(sampler.peak, _status_mib("VmRSS")),
        "time": time.time(),
    }
    Path(args.out).write_text(json.dumps(out))
    return 0 if error is None else 2


if __name__ == "__main__":
    sys.exit(main())
