"""Local stand-in data for the Flower-pattern examples: scikit-learn's 8x8 digits, IID."""

from __future__ import annotations

import numpy as np

from fedhive.data import load_dataset
from fedhive.data.partition import iid


def load_partition(partition_id: int, num_partitions: int):
    """(x_train, y_train, x_test, y_test) of one client; a fifth of its data is for testing."""
    data = load_dataset("digits", seed=0)
    mine = iid(len(data.y_train), num_partitions, seed=0).indices[partition_id]
    x, y = data.x_train[mine].astype(np.float32), data.y_train[mine].astype(np.int64)
    cut = len(mine) // 5
    return x[cut:], y[cut:], x[:cut], y[:cut]


def load_test():
    data = load_dataset("digits", seed=0)
    return data.x_test.astype(np.float32), data.y_test.astype(np.int64)
