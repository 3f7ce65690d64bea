"""A deployed client for the compression tests: plain Flower-style code, no codec in it.

It notes in ``--marker`` whether its persistent state held an error-feedback residual
when its first fit began (after a restart, it should).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import fedhive as fl


class Client(fl.client.NumPyClient):
    def __init__(self, pid: int, context, marker: Path) -> None:
        self.pid = pid
        self.context = context
        self.marker = marker

    def fit(self, parameters, config):
        if not self.marker.exists():
            had = "codec.residual" in self.context.state.array_records
            self.marker.write_text("residual" if had else "empty")
        rng = np.random.default_rng(self.pid)
        return [p + rng.normal(size=p.shape).astype(p.dtype) for p in parameters], 10, {}

    def evaluate(self, parameters, config):
        return float(np.abs(parameters[0]).mean()), 10, {}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--pid", type=int, default=0)
    parser.add_argument("--state", required=True)
    parser.add_argument("--audit", required=True)
    parser.add_argument("--marker", required=True)
    args = parser.parse_args()

    def client_fn(context):
        return Client(args.pid, context, Path(args.marker))

    fl.client.start_client(
        server_address=args.address,
        client_fn=client_fn,
        insecure=True,
        state_dir=args.state,
        audit_log=args.audit,
        max_retries=20,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
