"""Strategies: who trains each round, and how their results become the next model.

Every strategy but FedAvg is a :class:`ComposedStrategy`: FedAvg's sampling, an aggregation
rule (``composed.MeanRule``, ``robust``, ``fednova.NovaRule``, ``qfedavg.QFFLRule``) and an
optional server optimizer (``optimizers``). See ``docs/strategies.md``.
"""

from typing import Any

from fedhive.server.strategy.adaptive import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedhive.server.strategy.aggregate import WeightedMean, check_update
from fedhive.server.strategy.base import Aggregator, BufferingAggregator, Strategy
from fedhive.server.strategy.byzantine import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from fedhive.server.strategy.composed import ComposedStrategy
from fedhive.server.strategy.fault_tolerant_fedavg import FaultTolerantFedAvg
from fedhive.server.strategy.fedasync import FedAsync
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.fedbuff import FedBuff
from fedhive.server.strategy.fednova import FedNova
from fedhive.server.strategy.fedopt import FedOpt
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
    "FaultTolerantFedAvg",
    "FedMedian",
    "FedNova",
    "FedOpt",
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

#: Flower's DP wrappers, which live in :mod:`fedhive.privacy`; importing this package does
#: not load that one (they resolve on first use, as in ``fl.server.strategy.<name>``).
_DP_WRAPPERS = frozenset(
    {
        "DifferentialPrivacyClientSideAdaptiveClipping",
        "DifferentialPrivacyClientSideFixedClipping",
        "DifferentialPrivacyServerSideAdaptiveClipping",
        "DifferentialPrivacyServerSideFixedClipping",
    }
)


def __getattr__(name: str) -> Any:
    if name in _DP_WRAPPERS:
        import fedhive.privacy

        return getattr(fedhive.privacy, name)
    raise AttributeError(f"module 'fedhive.server.strategy' has no attribute {name!r}")
