"""Flower's simulation-pytorch pattern, legacy API: ``start_simulation`` with
``client_resources``, a centralized ``evaluate_fn``, fit-metric aggregation and
``client_fn(cid)`` as older Flower code writes it::

    python examples/flower/simulation_pytorch.py --num-clients 10 --rounds 3
"""

from __future__ import annotations

import argparse

import torch
from _data import load_partition, load_test
from quickstart_pytorch import FlowerClient, Net, test

import fedhive as fl
from fedhive.common import Metrics, NDArrays

NUM_CLIENTS = 10


def client_fn(cid: str) -> fl.client.Client:
    return FlowerClient(Net(), load_partition(int(cid), NUM_CLIENTS)).to_client()


def fit_config(server_round: int) -> dict[str, int]:
    return {"local_epochs": 3, "server_round": server_round}


def get_evaluate_fn():
    x, y = (torch.from_numpy(a) for a in load_test())

    def evaluate(server_round: int, parameters: NDArrays, config):
        net = Net()
        keys = net.state_dict().keys()
        net.load_state_dict({k: torch.tensor(v) for k, v in zip(keys, parameters, strict=True)})
        loss, accuracy = test(net, x, y)
        return loss, {"accuracy": accuracy}

    return evaluate


def sum_examples(metrics: list[tuple[int, Metrics]]) -> Metrics:
    return {"examples": sum(n for n, _ in metrics)}


def main(num_clients: int = NUM_CLIENTS, rounds: int = 3) -> fl.server.History:
    strategy = fl.server.strategy.FedAvg(
        fraction_fit=0.5,
        fraction_evaluate=0.0,
        min_fit_clients=num_clients // 2,
        min_available_clients=num_clients,
        on_fit_config_fn=fit_config,
        evaluate_fn=get_evaluate_fn(),
        fit_metrics_aggregation_fn=sum_examples,
    )
    history = fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=num_clients,
        client_resources={"num_cpus": 1, "num_gpus": 0.0},
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
        seed=0,
    )
    for rnd, acc in history.metrics_centralized["accuracy"]:
        print(f"round {rnd}: accuracy {acc:.3f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-clients", type=int, default=NUM_CLIENTS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.num_clients, args.rounds)
