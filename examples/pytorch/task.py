"""What the PyTorch server and clients share: the model, the data and the training loop.

The data are scikit-learn's 8x8 handwritten digits (bundled with scikit-learn, nothing
to download), split into train and test once, with the training part dealt out IID to
``num_partitions`` clients. Every process derives the same split from the same seed.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from fedhive.data import load_dataset
from fedhive.data.partition import iid

SEED = 0


class Net(nn.Module):
    """A small MLP for 8x8 digits: 64 -> 64 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    pairs = zip(model.state_dict().keys(), weights, strict=True)
    model.load_state_dict(OrderedDict((k, torch.from_numpy(w)) for k, w in pairs))


def load_partition(partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """This client's share of the training set."""
    data = load_dataset("digits", seed=SEED)
    indices = iid(len(data.y_train), num_partitions, SEED).indices[partition_id]
    return data.x_train[indices], data.y_train[indices]


def load_test_set() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset("digits", seed=SEED)
    return data.x_test, data.y_test


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> float:
    """Minibatch SGD; returns the mean loss of the last epoch."""
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total = 0.0
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(labels)).split(32):
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    return total / max(1, len(labels))


def test(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy)."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(y))
        accuracy = (logits.argmax(1) == torch.from_numpy(y)).float().mean()
    return float(loss), float(accuracy)
