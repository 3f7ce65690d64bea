"""A client process for the gRPC tests: written against the Flower 1.x API."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import fedhive as fl


class AddClient(fl.client.NumPyClient):
    def __init__(self, pid: int, mode: str) -> None:
        self.pid = pid
        self.mode = mode

    def get_parameters(self, config):
        return [np.zeros(4, np.float32)]

    def fit(self, parameters, config):
        if self.mode == "die":
            os._exit(3)  # the process dies mid-round
        if self.mode == "hang":
            time.sleep(60)
        if self.mode == "slow":
            time.sleep(3)  # longer than the server's heartbeat timeout in the test
        if self.mode == "nan":
            return [np.full_like(parameters[0], np.nan)], 1, {}
        return [p + 1.0 + self.pid for p in parameters], 1 + self.pid, {"pid": self.pid}

    def evaluate(self, parameters, config):
        return float(parameters[0].mean()), 1, {"pid": self.pid}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--pid", type=int, default=0)
    parser.add_argument("--mode", default="good")
    parser.add_argument("--node-id", default=None)
    parser.add_argument("--token", default="")
    parser.add_argument("--ca", default=None)
    parser.add_argument("--cert", default=None)
    parser.add_argument("--key", default=None)
    parser.add_argument("--audit", default=None)
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--sessions", type=int, default=1, help="clients in this process")
    parser.add_argument("--aio", action="store_true", help="start_clients: one event loop")
    parser.add_argument("--heartbeat", type=float, default=5.0)
    args = parser.parse_args()
    client = AddClient(args.pid, args.mode)
    if args.aio:
        return aio_many(args)
    if args.sessions > 1:
        return many(args)
    if not (args.node_id or args.token or args.ca or args.persistent):
        # exactly the Flower 1.x call
        fl.client.start_numpy_client(server_address=args.address, client=client)
        return 0
    kwargs = {}
    if args.cert:
        kwargs = {
            "certificate_chain": Path(args.cert).read_bytes(),
            "private_key": Path(args.key).read_bytes(),
        }
    try:
        fl.client.start_client(
            server_address=args.address,
            client=client.to_client(),
            root_certificates=Path(args.ca).read_bytes() if args.ca else None,
            node_id=args.node_id,
            auth_token=args.token,
            audit_log=args.audit,
            max_retries=40 if args.persistent else 3,
            persistent=args.persistent,
            **kwargs,
        )
    except fl.FedhiveError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


def many(args) -> int:
    """Many clients in one process, each with its own connection."""
    import threading

    errors = []

    def one(i: int) -> None:
        try:
            fl.client.start_numpy_client(
                server_address=args.address,
                client=AddClient(i % 3, "good"),
                node_id=f"{args.node_id or 'c'}-{i}",
                max_retries=20,
            )
        except fl.FedhiveError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exc in errors:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    return 2 if errors else 0


def aio_many(args) -> int:
    """Many clients in one process on one asyncio loop (``start_clients``)."""

    def client_fn(context):
        index = int(context.node_id.rsplit("-", 1)[1])
        return AddClient(index % 3, args.mode).to_client()

    nodes = [f"{args.node_id or 'c'}-{i}" for i in range(args.sessions)]
    tls = {}
    if args.ca:
        tls = {"root_certificates": Path(args.ca).read_bytes()}
        if args.cert:
            tls["certificate_chain"] = Path(args.cert).read_bytes()
            tls["private_key"] = Path(args.key).read_bytes()
    try:
        fl.client.start_clients(
            server_address=args.address,
            client_fn=client_fn,
            node_ids=nodes,
            insecure=not args.ca,
            **tls,
            auth_tokens={node: args.token for node in nodes} if args.token else None,
            max_retries=20,
            heartbeat_interval=args.heartbeat,
        )
    except fl.FedhiveError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
