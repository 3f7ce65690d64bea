"""A fedhive server for the PyTorch example: FedAvg on 8x8 digits, evaluated centrally.

    python examples/pytorch/server.py                    # waits for 2 clients on :8080

then start two clients (see client.py). ``--ca/--cert/--key`` turn on TLS.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from task import Net, get_weights, load_test_set, set_weights, test

import fedhive as fl


def weighted_average(metrics):
    """Example-weighted mean of the clients' accuracies."""
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

    torch.manual_seed(0)
    model = Net()
    x_test, y_test = load_test_set()

    def evaluate(server_round, parameters, config):
        set_weights(model, parameters)
        loss, accuracy = test(model, x_test, y_test)
        return loss, {"accuracy": accuracy}

    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=args.min_clients,
        min_evaluate_clients=args.min_clients,
        min_available_clients=args.min_clients,
        initial_parameters=fl.common.ndarrays_to_parameters(get_weights(model)),
        evaluate_fn=evaluate,
        on_fit_config_fn=lambda server_round: {"local_epochs": 1, "lr": 0.05},
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
    for server_round, loss in history.losses_centralized:
        accuracy = dict(history.metrics_centralized["accuracy"])[server_round]
        print(f"round {server_round}: loss {loss:.4f}, accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
