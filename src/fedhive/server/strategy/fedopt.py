"""FedOpt: the base Flower's adaptive strategies share (server-side optimizer options)."""

from __future__ import annotations

from typing import Unpack

from fedhive.common.errors import ConfigError
from fedhive.common.records import NDArrays, parameters_to_ndarrays
from fedhive.server.strategy.composed import FedAvgArgs
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.optimizers import check_positive, check_unit_interval

__all__ = ["FedOpt"]


class FedOpt(FedAvg):
    """FedAvg that carries the server optimizer's options, for subclasses to step with.

    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
    Optimization." ICLR 2021.

    As in Flower, it aggregates like FedAvg; a subclass overrides ``aggregate_fit`` (call
    ``super().aggregate_fit(...)`` for the weighted mean) and moves ``current_weights``
    with ``eta``, ``eta_l``, ``beta_1``, ``beta_2``, ``tau``, ``m_t`` and ``v_t``.
    ``initial_parameters`` is required; ``current_weights`` starts as its arrays. fedhive's
    own FedAdam, FedYogi and FedAdagrad compose a server optimizer instead
    (:mod:`fedhive.server.strategy.adaptive`) and are not subclasses of this one.

    Example::

        class MyOpt(FedOpt):
            def aggregate_fit(self, server_round, results, failures):
                mean, metrics = super().aggregate_fit(server_round, results, failures)
                ...  # step self.current_weights towards mean
    """

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.0,
        beta_2: float = 0.0,
        tau: float = 1e-9,
        **fedavg: Unpack[FedAvgArgs],
    ) -> None:
        initial = fedavg.get("initial_parameters")
        if initial is None:
            raise ConfigError(f"{type(self).__name__} needs initial_parameters (as in Flower)")
        super().__init__(**fedavg)
        self.current_weights: NDArrays = parameters_to_ndarrays(initial)
        self.eta = check_positive("eta", eta)
        self.eta_l = check_positive("eta_l", eta_l)
        self.tau = check_positive("tau", tau)
        self.beta_1 = check_unit_interval("beta_1", beta_1)
        self.beta_2 = check_unit_interval("beta_2", beta_2)
        self.m_t: NDArrays | None = None
        self.v_t: NDArrays | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(accept_failures={self.accept_failures})"
