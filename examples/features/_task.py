"""What the feature examples share: scikit-learn's 8x8 digits dealt out to clients, a
small PyTorch model, its client, and the server's evaluation on the test split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import fedhive as fl
from fedhive.common import Metrics, NDArrays
from fedhive.data import load_dataset
from fedhive.data.partition import dirichlet, iid

DATA = load_dataset("digits", seed=0)


def partition(num_clients: int, alpha: float | None = None, seed: int = 0) -> list[np.ndarray]:
    """Each client's training rows: IID, or label-skewed (Dirichlet ``alpha``)."""
    if alpha is None:
        return iid(len(DATA.y_train), num_clients, seed).indices
    return dirichlet(DATA.y_train, num_clients, alpha, seed, min_size=10).indices


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def get_weights(model: nn.Module) -> NDArrays:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: NDArrays) -> None:
    keys = list(model.state_dict())
    model.load_state_dict({k: torch.as_tensor(w) for k, w in zip(keys, weights, strict=True)})


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 0.05) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xs, ys = torch.as_tensor(x), torch.as_tensor(y)
    model.train()
    loss = torch.zeros(())
    for _ in range(epochs):
        for i in range(0, len(ys), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[i : i + 32]), ys[i : i + 32])
            loss.backward()
            opt.step()
    return loss.item()


@torch.no_grad()
def test(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    model.eval()
    logits = model(torch.as_tensor(x))
    ys = torch.as_tensor(y)
    accuracy = (logits.argmax(1) == ys).float().mean().item()
    return nn.functional.cross_entropy(logits, ys).item(), accuracy


class TorchClient(fl.client.NumPyClient):
    """Trains ``make_model()`` on its rows of the digits for ``local_epochs`` per round."""

    def __init__(self, make_model: Callable[[], nn.Module], rows: np.ndarray) -> None:
        self.model = make_model()
        self.x, self.y = DATA.x_train[rows], DATA.y_train[rows]

    def get_parameters(self, config):
        return get_weights(self.model)

    def fit(self, parameters, config):
        set_weights(self.model, parameters)
        loss = train(self.model, self.x, self.y, int(config.get("local_epochs", 1)))
        return get_weights(self.model), len(self.y), {"loss": loss}

    def evaluate(self, parameters, config):
        set_weights(self.model, parameters)
        loss, accuracy = test(self.model, self.x, self.y)
        return loss, len(self.y), {"accuracy": accuracy}


def client_fn_for(make_model: Callable[[], nn.Module], parts: list[np.ndarray]):
    def client_fn(context: fl.client.Context) -> fl.client.Client:
        rows = parts[int(context.node_config["partition-id"])]
        return TorchClient(make_model, rows).to_client()

    return client_fn


def central_evaluation(make_model: Callable[[], nn.Module]):
    """The server's ``evaluate_fn``: loss and accuracy on the digits' test split."""

    def evaluate(server_round: int, parameters: NDArrays, config):
        model = make_model()
        set_weights(model, parameters)
        loss, accuracy = test(model, DATA.x_test, DATA.y_test)
        return loss, {"accuracy": accuracy}

    return evaluate


def fedavg_args(make_model: Callable[[], nn.Module], local_epochs: int = 1) -> dict:
    """FedAvg's arguments for these examples: the initial model, server evaluation, the
    clients' local epochs, no federated evaluation."""
    return {
        "fraction_evaluate": 0.0,
        "initial_parameters": fl.common.ndarrays_to_parameters(get_weights(make_model())),
        "evaluate_fn": central_evaluation(make_model),
        "on_fit_config_fn": lambda server_round: {"local_epochs": local_epochs},
    }


def accuracies(history: fl.server.History) -> list[float]:
    return [value for _, value in history.metrics_centralized["accuracy"]]


def weighted_average(metrics: list[tuple[int, Metrics]]) -> Metrics:
    total = sum(n for n, _ in metrics)
    keys = {k for _, m in metrics for k in m}
    return {k: sum(n * float(m[k]) for n, m in metrics if k in m) / total for k in keys}
