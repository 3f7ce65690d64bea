"""A fedhive server for the Keras example: FedAvg over whatever model the clients bring.

    python examples/keras/server.py                       # waits for 2 clients on :8080

It holds no model of its own: as in Flower, the first model comes from one client
(``get_parameters``), and accuracy is the clients' evaluation, weighted by examples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fedhive as fl


def weighted_average(metrics):
    total = sum(n for n, _ in metrics)
    return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / max(1, total)}


def tls_certificates(parser, args):
    """``(ca, cert, key)`` for start_server, or None without --cert/--key/--ca."""
    if not (args.ca or args.cert or args.key):
        return None
    if not (args.cert and args.key):
        parser.error("TLS needs both --cert SERVER.pem and --key SERVER.key")
    try:
        ca = Path(args.ca).read_bytes() if args.ca else b""  # --ca: only to check clients
        return ca, Path(args.cert).read_bytes(), Path(args.key).read_bytes()
    except OSError as exc:
        parser.error(f"cannot read {exc.filename}: {exc.strerror}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="0.0.0.0:8080", help="HOST:PORT to serve on")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-clients", type=int, default=2)
    parser.add_argument("--ca", help="CA certificate (PEM); with --cert/--key: TLS")
    parser.add_argument("--cert", help="server certificate (PEM)")
    parser.add_argument("--key", help="server private key (PEM)")
    args = parser.parse_args()

    strategy = fl.server.strategy.FedAvg(
        min_fit_clients=args.min_clients,
        min_evaluate_clients=args.min_clients,
        min_available_clients=args.min_clients,
        on_fit_config_fn=lambda server_round: {"local_epochs": 1},
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    certificates = tls_certificates(parser, args)
    host = args.address.rsplit(":", 1)[0]
    history = fl.server.start_server(
        server_address=args.address,
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        certificates=certificates,
        on_started=lambda server: print(f"listening on {host}:{server.port}", flush=True),
    )
    for server_round, loss in history.losses_distributed:
        accuracy = dict(history.metrics_distributed["accuracy"])[server_round]
        print(f"round {server_round}: loss {loss:.4f}, accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
