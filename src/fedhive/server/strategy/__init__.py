"""Strategies: who trains each round, and how their results become the next model.

Every strategy but FedAvg is a :class:`ComposedStrategy`: FedAvg's sampling, an aggregation
rule (``composed.MeanRule``, ``robust``, ``fednova.NovaRule``, ``qfedavg.QFFLRule``) and an
optional server optimizer (``optimizers``). See ``docs/strategies.md``.
"""

from fedhive.server.strategy.adaptive import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedhive.server.strategy.aggregate import WeightedMean, check_update
from fedhive.server.strategy.base import Aggregator, BufferingAggregator, Strategy
from fedhive.server.strategy.byzantine import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from fedhive.server.strategy.composed import ComposedStrategy
from fedhive.server.strategy.fedasync import FedAsync
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.fedbuff import FedBuff
from fedhive.server.strategy.fednova import FedNova
from fedhive.server.strategy.fedprox import FedProx
from fedhive.server.strategy.qfedavg import QFedAvg
from fedhive.server.strategy.scaffold import Scaffold

__all__ = [
    "Aggregator",
    "Bulyan",
    "BufferingAggregator",
    "ComposedStrategy",
    "FedAdagrad",
    "FedAdam",
    "FedAsync",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedMedian",
    "FedNova",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "QFedAvg",
    "Scaffold",
    "Strategy",
    "WeightedMean",
    "check_update",
]
