"""Strategies: who trains each round, and how their results become the next model."""

from fedhive.server.strategy.aggregate import WeightedMean, check_update
from fedhive.server.strategy.base import Aggregator, BufferingAggregator, Strategy
from fedhive.server.strategy.fedavg import FedAvg

__all__ = [
    "Aggregator",
    "BufferingAggregator",
    "FedAvg",
    "Strategy",
    "WeightedMean",
    "check_update",
]
