"""The server side of compression: a round stage that asks for and decodes encodings.

:class:`CompressionStage` is a reply stage (:mod:`fedhive.server.stages`). Before the
exchange it puts the ``"codec.task"`` record into every fit instruction (and, with a
downlink codec, replaces the model by its encoding, encoded once for all clients); each
reply's payload is then validated and decoded into the client's model, the server's
exact model plus the decoded update, before the strategy's reply check and fold. A reply
that does not decode is refused with the reason (a failure of that client; the aggregate
never sees it). A plain reply (a client without the mod) is accepted as it is.

Central DP composes: its noise is added to the aggregate, after every update was
decoded. Strategies needing individual updates (median, Krum) get decoded ones.

Under the asynchronous policy (:mod:`fedhive.server.asynchronous`) the stage instructs
each dispatch and keeps, per client in flight, the model that client was sent and the
seed its task named: a stale update is decoded against its own base model before it
enters the buffer, so staleness weighting sees the same update as without compression.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from fedhive.common.errors import CheckpointError, InvalidUpdate, SerdeError
from fedhive.common.message import MessageType, derive_seed
from fedhive.common.records import (
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    RecordDict,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.compression.config import Compression
from fedhive.compression.payload import (
    PAYLOAD_RECORD,
    TASK_RECORD,
    Layout,
    decode_update,
    encode_model,
    task_record,
)
from fedhive.server.client_manager import ClientProxy
from fedhive.server.stages import UPDATES, ReplyStage

if TYPE_CHECKING:
    from fedhive.server.engine import RoundDriver

__all__ = ["CompressionStage"]

_RESIDUAL = "downlink_residual"


def _merge(extras: RecordDict, more: RecordDict) -> RecordDict:
    return RecordDict(
        {**extras.array_records, **more.array_records},
        {**extras.config_records, **more.config_records},
        extras.metric_records,
    )


class CompressionStage(ReplyStage):
    """Encode the broadcast (optional) and decode each client's update (see the module
    docstring). Memory: the server's model once more while a downlink encoding is held,
    plus one decoded update at a time."""

    name = "compression"
    consumes = frozenset({UPDATES})

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        self._seed = 0
        self._downlink_residual: NDArrays | None = None
        #: client id -> (seed, model sent) of the task in flight (one per client)
        self._sent: dict[str, tuple[int, Parameters]] = {}

    def __repr__(self) -> str:
        return f"CompressionStage({self.compression!r})"

    def state_dict(self) -> RecordDict:
        """The server-side error-feedback residual of the last broadcast (if any)."""
        if self._downlink_residual is None:
            return RecordDict()
        arrays = {str(i): r for i, r in enumerate(self._downlink_residual)}
        return RecordDict({_RESIDUAL: arrays})

    def load_state_dict(self, state: RecordDict) -> None:
        arrays = state.array_records.get(_RESIDUAL)
        if arrays is None or set(state.array_records) != {_RESIDUAL}:
            raise CheckpointError(
                f"a compression stage's checkpoint holds {sorted(state.array_records)}, "
                f"expected [{_RESIDUAL!r}]"
            )
        if list(arrays) != [str(i) for i in range(len(arrays))]:
            raise CheckpointError("the downlink residual's arrays are not numbered 0, 1, ...")
        self._downlink_residual = [np.asarray(a, np.float32) for a in arrays.values()]

    def instruct(
        self, driver: RoundDriver, instructions: list[tuple[ClientProxy, FitIns]]
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The fit instructions with the codec's task record (and the encoded model)."""
        from fedhive.server.policy import SyncRounds

        if isinstance(driver.engine.policy, SyncRounds):
            self._sent.clear()  # one instruction per round: last round's notes go
        c = self.compression
        self._seed = derive_seed(driver.engine.seed, driver.server_round, "", "codec")
        record = RecordDict(
            config_records={TASK_RECORD: task_record(c.uplink, self._seed, c.downlink)}
        )
        encoded: dict[int, FitIns] = {}
        out = []
        for client, ins in instructions:
            key = id(ins)
            if key not in encoded:
                encoded[key] = self._encoded(driver, ins, record)
            out.append((client, encoded[key]))
            self._sent[client.cid] = (self._seed, ins.parameters)
        return out

    @property
    def asynchronous_reason(self) -> str:
        if not self.compression.server_error_feedback:
            return ""
        return (
            "server-side error feedback carries one broadcast's error into the next, and "
            "asynchronous dispatches send one version many times: drop server_error_feedback"
        )

    def in_flight(self, client_ids: set[str]) -> None:
        for cid in [c for c in self._sent if c not in client_ids]:
            del self._sent[cid]  # its task failed or timed out: no reply will be decoded

    def _encoded(self, driver: RoundDriver, ins: FitIns, record: RecordDict) -> FitIns:
        down = self.compression.downlink
        if down is None:
            return replace(ins, config=dict(ins.config), extras=_merge(ins.extras, record))
        model = [np.asarray(a) for a in ins.parameters.arrays]
        target = model
        residual = self._downlink_residual
        feedback = self.compression.server_error_feedback and residual is not None
        if feedback and [r.shape for r in residual] == [a.shape for a in model]:  # type: ignore[union-attr]
            target = [a + r for a, r in zip(model, residual, strict=True)]  # type: ignore[arg-type]
        rng = np.random.default_rng(
            derive_seed(driver.engine.seed, driver.server_round, "", "down")
        )
        records, decoded = encode_model(down, target, rng)
        if self.compression.server_error_feedback:
            self._downlink_residual = [
                np.subtract(t, d, dtype=np.float32) for t, d in zip(target, decoded, strict=True)
            ]
        return FitIns(
            ndarrays_to_parameters([]),
            dict(ins.config),
            _merge(_merge(ins.extras, record), records),
        )

    def transform(self, driver: RoundDriver, client_id: str, result: FitRes) -> FitRes:
        codec = self.compression.uplink
        extras = result.extras
        encoded = PAYLOAD_RECORD in extras.array_records
        if codec is None or not encoded:
            return result
        seed, base = self._sent.pop(client_id, (self._seed, driver.engine.parameters))
        reference = parameters_to_ndarrays(base)
        layout = Layout.of(reference, codec.min_size)
        if len(result.parameters) != 0:
            raise InvalidUpdate(
                client_id,
                driver.server_round,
                MessageType.FIT,
                "a compressed reply carries its update in extras and no model arrays",
            )
        try:
            update = decode_update(codec, layout, extras, seed)
        except SerdeError as exc:
            raise InvalidUpdate(client_id, driver.server_round, MessageType.FIT, str(exc)) from None
        model = [
            np.add(ref, u, dtype=ref.dtype if ref.dtype.kind == "f" else np.float64)
            for ref, u in zip(reference, update, strict=True)
        ]
        rest = RecordDict(
            {k: v for k, v in extras.array_records.items() if k != PAYLOAD_RECORD},
            extras.config_records,
            extras.metric_records,
        )
        return replace(result, parameters=ndarrays_to_parameters(model), extras=rest)
