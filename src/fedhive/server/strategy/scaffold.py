"""SCAFFOLD, server side: control variates correct the clients' drift.

Wire protocol (the client side is :func:`fedhive.client.mods.scaffold_mod`):

- the fit instruction carries the model's ``k`` arrays followed by the server control
  variate ``c`` (``k`` more arrays, in the model's float dtypes), with config
  ``"scaffold": True`` and ``"scaffold_num_arrays": k``;
- the reply carries the trained model ``y_i`` followed by ``delta c_i`` (``k`` arrays).
"""

from __future__ import annotations

from typing import Any, Unpack, final

import numpy as np

from fedhive.common.errors import ConfigError, InvalidUpdate
from fedhive.common.records import (
    FitIns,
    FitRes,
    NDArray,
    NDArrays,
    Parameters,
    RecordDict,
    Scalar,
    parameters_to_ndarrays,
)
from fedhive.server.client_manager import ClientManager, ClientProxy
from fedhive.server.strategy.aggregate import check_update
from fedhive.server.strategy.base import Aggregator
from fedhive.server.strategy.composed import (
    ComposedRound,
    ComposedStrategy,
    FedAvgArgs,
    MeanRule,
    cast_like,
)
from fedhive.server.strategy.fedavg import FedAvg
from fedhive.server.strategy.optimizers import ServerSGD

__all__ = ["NUM_ARRAYS_KEY", "SCAFFOLD_KEY", "Scaffold"]

SCAFFOLD_KEY = "scaffold"
NUM_ARRAYS_KEY = "scaffold_num_arrays"
_STATE = "scaffold.c"


@final
class Scaffold(ComposedStrategy):
    """SCAFFOLD: stochastic controlled averaging (Option II control variates).

    Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled
    Averaging for Federated Learning." ICML 2020.

    Clients train with the corrected gradient ``g + c - c_i``, keep their variate ``c_i`` in
    their persistent state (``context.state``) and return ``y_i`` and
    ``delta c_i = c_i+ - c_i`` with ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (``K`` local
    steps). The server sets ``x <- x + server_learning_rate * (mean_i y_i - x)`` and
    ``c <- c + sum_i delta c_i / N``, ``N`` being the number of available clients, so
    ``c`` stays the mean of all clients' variates. fedhive weights ``y_i`` by
    ``num_examples`` (the paper averages uniformly), so with zero variates SCAFFOLD is
    FedAvg. ``c`` (float64) is in :meth:`state_dict`, so checkpoints carry it.

    Clients must run :func:`fedhive.client.mods.scaffold_mod` and apply its correction
    (the CLI's simulated client does; see ``fedhive.client.mods.scaffold_correction``).
    Replies carry twice the model, so the engine's layout check is off
    (``validate_fit_results = False``) and this strategy checks both halves itself.
    Memory: O(model) for the mean and the variate sum, plus the stored ``c``.

    Example::

        strategy = Scaffold(min_fit_clients=10, server_learning_rate=1.0)
        start_simulation(client_fn=..., strategy=strategy, mods=[scaffold_mod], ...)
    """

    validate_fit_results = False

    def __init__(self, *, server_learning_rate: float = 1.0, **fedavg: Unpack[FedAvgArgs]) -> None:
        optimizer = ServerSGD(server_learning_rate)
        self.server_learning_rate = optimizer.lr
        self.control_variate: NDArrays | None = None
        self.num_clients = 0
        super().__init__(sampling=FedAvg(**fedavg), rule=MeanRule(), server_optimizer=optimizer)

    def variate_for(self, model: NDArrays) -> NDArrays:
        """The server variate ``c`` (zeros before the first update) for this model's layout."""
        if self.control_variate is None:
            return [np.zeros(a.shape, dtype=np.float64) for a in model]
        shapes = [c.shape for c in self.control_variate]
        if shapes != [a.shape for a in model]:
            raise ConfigError(
                f"the SCAFFOLD control variate has layer shapes {shapes} but the model has "
                f"{[a.shape for a in model]}; the model changed or the checkpoint belongs to "
                "another run"
            )
        return self.control_variate

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.num_clients = client_manager.num_available()
        model = parameters_to_ndarrays(parameters)
        payload = Parameters(arrays=model + cast_like(self.variate_for(model), model))
        extra: dict[str, Scalar] = {SCAFFOLD_KEY: True, NUM_ARRAYS_KEY: len(model)}
        return [(client, FitIns(payload, {**ins.config, **extra})) for client, ins in instructions]

    def fit_aggregator(self, server_round: int, parameters: Parameters) -> Aggregator:
        reference = parameters_to_ndarrays(parameters)
        inner = ComposedRound(self, server_round, reference, check=True)
        return _ScaffoldRound(self, inner)

    def state_dict(self) -> RecordDict:
        state = super().state_dict()
        if self.control_variate is not None:
            record = {str(i): c for i, c in enumerate(self.control_variate)}
            state.array_records[_STATE] = record
        return state

    def load_state_dict(self, state: RecordDict) -> None:
        super().load_state_dict(state)
        record = state.array_records.get(_STATE)
        self.control_variate = (
            None
            if record is None
            else [np.array(record[str(i)], dtype=np.float64) for i in range(len(record))]
        )


class _ScaffoldRound:
    """Splits each reply into (y_i, delta c_i), checks both, folds y_i and sums delta c_i."""

    def __init__(self, strategy: Scaffold, inner: ComposedRound) -> None:
        self.strategy = strategy
        self.inner = inner
        self.delta_c: list[NDArray] = [np.zeros(r.shape, np.float64) for r in inner.reference]
        self.count = 0

    def add(self, client: ClientProxy, result: Any) -> None:
        rnd, k = self.inner.server_round, len(self.inner.reference)
        if not isinstance(result, FitRes):
            raise InvalidUpdate(client.cid, rnd, "fit", "reply is not a FitRes")
        arrays = parameters_to_ndarrays(result.parameters)
        if len(arrays) != 2 * k:
            raise InvalidUpdate(
                client.cid,
                rnd,
                "fit",
                f"SCAFFOLD expects {2 * k} arrays (the model, then its control variate "
                f"delta), got {len(arrays)}; does the client run "
                "fedhive.client.mods.scaffold_mod?",
            )
        model, delta_c = arrays[:k], arrays[k:]
        check_update(delta_c, self.inner.reference, client_id=client.cid, server_round=rnd)
        self.inner.add_arrays(client.cid, model, result)  # checks the model half too
        for acc, d in zip(self.delta_c, delta_c, strict=True):
            acc += d
        self.count += 1

    def add_failure(self, failure: BaseException) -> None:
        self.inner.add_failure(failure)

    def finalize(self) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = self.inner.finalize()
        if params is not None:
            n = max(self.strategy.num_clients, self.count)
            c = self.strategy.variate_for(self.inner.reference)
            self.strategy.control_variate = [
                old + acc / n for old, acc in zip(c, self.delta_c, strict=True)
            ]
        return params, metrics
