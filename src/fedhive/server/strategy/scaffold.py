"""SCAFFOLD, server side: control variates correct the clients' drift.

Wire protocol (the client side is :func:`fedhive.client.mods.scaffold_mod`), with named
records beside the model (``extras``, see :class:`~fedhive.common.records.FitRes`):

- the fit instruction carries the model's ``k`` arrays, config ``"scaffold": True`` and
  the server control variate ``c`` in ``FitIns.extras.array_records["scaffold"]``
  (arrays ``"0"`` .. ``"k-1"``, in the model's float dtypes);
- the reply carries the trained model ``y_i`` (``k`` arrays) and ``delta c_i`` in
  ``FitRes.extras.array_records["scaffold"]``, an array record like the model.
"""

from __future__ import annotations

import functools
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
from fedhive.server.strategy.aggregate import check_fit_reply
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
from fedhive.server.strategy.scaffold_mod import scaffold_mod
from fedhive.server.strategy.traits import ExtraRecord, StrategyTraits, UpdateLayout

__all__ = ["NUM_ARRAYS_KEY", "SCAFFOLD_KEY", "Scaffold"]

#: The fit config flag of a SCAFFOLD round and the name of its ``extras`` array record.
SCAFFOLD_KEY = "scaffold"
#: Kept for compatibility: the config key of the former wire format (the variate appended
#: to the model's arrays); no longer sent, the variates travel in ``extras``.
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
    ``c`` travels in ``FitIns.extras`` and ``delta c_i`` in ``FitRes.extras`` (record
    ``"scaffold"``, see the module doc); the engine checks both against the layout in
    ``traits`` and this strategy's aggregator checks them again (it may be fed directly).
    Memory: O(model) for the mean and the variate sum, plus the stored ``c``.

    Example::

        strategy = Scaffold(min_fit_clients=10, server_learning_rate=1.0)
        start_simulation(client_fn=..., strategy=strategy, mods=[scaffold_mod], ...)
    """

    def __init__(self, *, server_learning_rate: float = 1.0, **fedavg: Unpack[FedAvgArgs]) -> None:
        optimizer = ServerSGD(server_learning_rate)
        self.server_learning_rate = optimizer.lr
        self.control_variate: NDArrays | None = None
        self.num_clients = 0
        super().__init__(sampling=FedAvg(**fedavg), rule=MeanRule(), server_optimizer=optimizer)

    @property
    def traits(self) -> StrategyTraits:
        """Streaming, not a plain weighted mean (the aggregate also carries the control
        variates: secure aggregation and DP refuse it), requires
        :func:`~fedhive.client.mods.scaffold_mod`, and each reply carries the variate
        delta as the extra record ``"scaffold"``, laid out like the model."""
        return _traits()

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
        variate = cast_like(self.variate_for(model), model)
        record = {str(i): c for i, c in enumerate(variate)}
        # One instruction per distinct one from the sampling (usually one for all), so a
        # transport that encodes each content once sends the model and c encoded once.
        shared: dict[int, FitIns] = {}
        out = []
        for client, ins in instructions:
            fit = shared.get(id(ins))
            if fit is None:
                extras = RecordDict(
                    {**ins.extras.array_records, SCAFFOLD_KEY: record},
                    ins.extras.config_records,
                    ins.extras.metric_records,
                )
                config: dict[str, Scalar] = {**ins.config, SCAFFOLD_KEY: True}
                fit = shared[id(ins)] = FitIns(ins.parameters, config, extras)
            out.append((client, fit))
        return out

    def round_aggregator(
        self, server_round: int, parameters: Parameters, *, check: bool
    ) -> Aggregator:
        reference = parameters_to_ndarrays(parameters)
        # The delta c_i is checked in every add, whoever feeds the aggregator (it is
        # refused whole there, so the engine's check of the same layout is repeated).
        inner = ComposedRound(self, server_round, reference, check=False)
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


@functools.cache
def _traits() -> StrategyTraits:
    # Cached: the engine asks for the traits every reply.
    return StrategyTraits(
        individual_updates=False,
        required_mods=(scaffold_mod,),
        layout=UpdateLayout(extras=(ExtraRecord(SCAFFOLD_KEY, like_model=True),)),
        reason="its aggregate also carries the clients' control variates",
    )


class _ScaffoldRound:
    """Checks each reply's y_i and delta c_i (its extras), folds y_i and sums delta c_i."""

    def __init__(self, strategy: Scaffold, inner: ComposedRound) -> None:
        self.strategy = strategy
        self.inner = inner
        self.layout = strategy.traits.layout
        self.delta_c: list[NDArray] = [np.zeros(r.shape, np.float64) for r in inner.reference]
        self.count = 0

    def add(self, client: ClientProxy, result: Any) -> None:
        rnd = self.inner.server_round
        if not isinstance(result, FitRes):
            raise InvalidUpdate(client.cid, rnd, "fit", "reply is not a FitRes")
        extras = result.extras
        delta_c = extras.array_records.get(SCAFFOLD_KEY) if isinstance(extras, RecordDict) else None
        if delta_c is None:
            raise InvalidUpdate(
                client.cid,
                rnd,
                "fit",
                f"SCAFFOLD expects the control-variate delta in the extras array record "
                f"{SCAFFOLD_KEY!r} of the reply, which has none; does the client run "
                "fedhive.client.mods.scaffold_mod?",
            )
        check_fit_reply(
            result, self.inner.reference, self.layout, client_id=client.cid, server_round=rnd
        )
        self.inner.add_arrays(client.cid, parameters_to_ndarrays(result.parameters), result)
        for acc, d in zip(self.delta_c, delta_c.values(), strict=True):
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
