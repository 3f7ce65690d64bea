"""Robust strategies: FedAvg's sampling with a Byzantine-robust rule from ``robust.py``.

All of them buffer the round's models: O(clients x model) memory (see
:mod:`fedhive.server.strategy.robust`). None keeps state across rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack, cast, final

from fedhive.common.errors import ConfigError
from fedhive.common.records import NDArrays
from fedhive.server.strategy.composed import ComposedStrategy, FedAvgArgs
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.robust import BulyanRule, KrumRule, MedianRule, TrimmedMeanRule

__all__ = ["Bulyan", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum"]


def _sampling(name: str, fedavg: FedAvgArgs, min_results: int) -> FedAvg:
    """FedAvg's sampling, refusing settings that can never give ``min_results`` clients."""
    sampling = FedAvg(**fedavg)
    if sampling.fraction_fit == 0.0 and sampling.min_fit_clients < min_results:
        raise ConfigError(
            f"{name} needs at least {min_results} results per round, but fraction_fit=0 "
            f"samples exactly min_fit_clients={sampling.min_fit_clients}; raise "
            "min_fit_clients or lower num_malicious_clients"
        )
    return sampling


@final
class FedMedian(ComposedStrategy):
    """The coordinate-wise median of the clients' models (unweighted).

    Yin, Chen, Ramchandran, Bartlett. "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates." ICML 2018.

    Robust to fewer than half of the clients being Byzantine, per coordinate. Memory:
    O(clients x model).

    Example::

        strategy = FedMedian(min_fit_clients=5, min_available_clients=5)
    """

    def __init__(self, **fedavg: Unpack[FedAvgArgs]) -> None:
        super().__init__(sampling=FedAvg(**fedavg), rule=MedianRule())


@final
class FedTrimmedAvg(ComposedStrategy):
    """The coordinate-wise trimmed mean of the clients' models (unweighted).

    Yin, Chen, Ramchandran, Bartlett. "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates." ICML 2018.

    For each coordinate, drop the ``int(beta * n)`` largest and smallest values and average
    the rest. ``beta`` must be in [0, 0.5) (Flower's default 0.2); ``beta=0`` is the plain
    unweighted mean. Memory: O(clients x model).

    Example::

        strategy = FedTrimmedAvg(beta=0.1, min_fit_clients=10)
    """

    def __init__(self, *, beta: float = 0.2, **fedavg: Unpack[FedAvgArgs]) -> None:
        rule = TrimmedMeanRule(beta)
        self.beta = rule.beta
        super().__init__(sampling=FedAvg(**fedavg), rule=rule)


@final
class Krum(ComposedStrategy):
    """Krum: the model closest to its ``n - f - 2`` nearest neighbours.

    Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent." NeurIPS 2017.

    ``num_malicious_clients`` is ``f``. The paper's guarantee needs ``n >= 2f + 3``
    results; with fewer, the scores use ``max(1, n - f - 2)`` neighbours, as in Flower,
    and a warning is logged. With ``num_clients_to_keep = m > 0`` it is Multi-Krum, as in
    Flower: the mean of the ``m`` best models weighted by ``num_examples``
    (``weighted=False`` gives the unweighted mean, which a Byzantine client cannot sway by
    claiming a large count). Equal scores go to the smallest client id. Memory:
    O(clients x model) plus a clients x clients distance matrix.

    Example::

        strategy = Krum(num_malicious_clients=2, min_fit_clients=10)
    """

    def __init__(
        self,
        *,
        num_malicious_clients: int = 0,
        num_clients_to_keep: int = 0,
        weighted: bool = True,
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        rule = KrumRule(num_malicious_clients, num_clients_to_keep, weighted=weighted)
        self.num_malicious_clients, self.num_clients_to_keep = rule.f, rule.m
        super().__init__(sampling=FedAvg(**fedavg), rule=rule)


@final
class MultiKrum(ComposedStrategy):
    """Multi-Krum: the mean of the ``m`` models with the best Krum scores.

    Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent." NeurIPS 2017.

    ``num_clients_to_keep`` is ``m``; 0 (the default) means ``n - f``, the paper's
    choice. The mean is weighted by ``num_examples``, as Flower's Multi-Krum is
    (``weighted=False``: unweighted, as in the paper). Fewer than ``2f + 3`` results
    are scored on ``max(1, n - f - 2)`` neighbours with a warning, as in :class:`Krum`.
    Ties go to the smallest client id. Memory: O(clients x model) plus a clients x
    clients distance matrix.

    Example::

        strategy = MultiKrum(num_malicious_clients=2, min_fit_clients=10)
    """

    def __init__(
        self,
        *,
        num_malicious_clients: int = 0,
        num_clients_to_keep: int = 0,
        weighted: bool = True,
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        rule = KrumRule(num_malicious_clients, num_clients_to_keep, multi=True, weighted=weighted)
        self.num_malicious_clients, self.num_clients_to_keep = rule.f, rule.m
        super().__init__(sampling=FedAvg(**fedavg), rule=rule)


@final
class Bulyan(ComposedStrategy):
    """Bulyan: Krum-based selection, then a coordinate-wise trimmed mean around the median.

    El Mhamdi, Guerraoui, Rouault. "The Hidden Vulnerability of Distributed Learning in
    Byzantium." ICML 2018.

    Needs ``n >= 4f + 3`` results per round (``f = num_malicious_clients``). Selects
    ``theta = n - 2f`` models by repeated Krum, then averages, per coordinate, the
    ``theta - 2f`` selected values nearest to their median. ``to_keep`` (as in Flower)
    makes each selection step Multi-Krum: the ``to_keep`` best models are averaged and
    the remaining model nearest to that average is selected; 0 means plain Krum.
    Memory: O(clients x model) plus a clients x clients distance matrix.

    As in Flower, ``first_aggregation_rule`` may replace Krum in the selection step: it is
    called as ``rule(results, num_malicious_clients=f, **aggregation_rule_kwargs)`` with
    ``results`` a list of ``(arrays, num_examples)`` of the models not yet selected, and
    the model nearest to what it returns is selected (its own output if it returns one of
    them). Keyword arguments that are not FedAvg's are ``aggregation_rule_kwargs``; they
    are refused without a ``first_aggregation_rule``.

    Example::

        strategy = Bulyan(num_malicious_clients=1, min_fit_clients=7)
    """

    def __init__(
        self,
        *,
        num_malicious_clients: int = 0,
        to_keep: int = 0,
        first_aggregation_rule: Callable[..., NDArrays] | None = None,
        **fedavg: Any,
    ) -> None:
        names = set(FedAvgArgs.__annotations__)
        extra = {k: v for k, v in fedavg.items() if k not in names}
        fedavg_args = cast(FedAvgArgs, {k: v for k, v in fedavg.items() if k in names})
        if extra and first_aggregation_rule is None:
            raise TypeError(f"Bulyan() got unexpected keyword arguments {sorted(extra)}")
        if first_aggregation_rule is not None and not callable(first_aggregation_rule):
            raise ConfigError("first_aggregation_rule must be callable")
        rule = BulyanRule(num_malicious_clients, to_keep, first_aggregation_rule, extra)
        self.num_malicious_clients, self.to_keep = rule.f, rule.to_keep
        super().__init__(sampling=_sampling("Bulyan", fedavg_args, rule.min_results()), rule=rule)
