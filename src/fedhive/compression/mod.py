"""The client side of compression: a mod that decodes the model and encodes the update.

It acts only on fit tasks whose extras carry the ``"codec.task"`` record (the server's
:class:`~fedhive.compression.CompressionStage` puts it there), so it can sit in every
client's stack: ``start_client`` puts it there by default, and clients answer compressed
rounds without code changes. Put local DP mods after it (``mods=[compression_mod,
LocalDpMod(...)]``, the default order): they see the reply first, so the update is
clipped and noised, then encoded.

Error feedback (Stich et al. 2018; Karimireddy et al. 2019): with
``error_feedback=True`` the client adds its residual ``e`` to the update, sends
``C(u + e)`` and keeps ``e' = u + e - D(C(u + e))`` in ``context.state`` (array record
``"codec.residual"``): in simulation it outlives the rebuilt virtual client (and spills to
disk with large states, into checkpoints too); a deployed client started with
``state_dir`` keeps it across restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from fedhive.common.context import Context, Handler, Mod
from fedhive.common.errors import ProtocolError, SerdeError
from fedhive.common.message import Message, MessageType
from fedhive.common.records import (
    LAYERS_RECORD,
    FitIns,
    FitRes,
    NDArrays,
    RecordDict,
    ndarrays_to_parameters,
)
from fedhive.compression.payload import (
    MODEL_RECORD,
    PAYLOAD_RECORD,
    TASK_RECORD,
    Layout,
    codec_from_task,
    decode_model,
    encode_update,
)

__all__ = ["RESIDUAL_RECORD", "compression_mod", "with_compression_mod"]

#: Record of ``context.state.array_records`` holding the error-feedback residual.
RESIDUAL_RECORD = "codec.residual"
_OURS = (TASK_RECORD, MODEL_RECORD, f"{MODEL_RECORD}.info")


def _without_ours(extras: RecordDict) -> RecordDict:
    return RecordDict(
        {k: v for k, v in extras.array_records.items() if k not in _OURS},
        {k: v for k, v in extras.config_records.items() if k not in _OURS},
        extras.metric_records,
    )


def _update(model: NDArrays, trained: NDArrays) -> NDArrays:
    if len(trained) != len(model):
        raise ProtocolError(
            f"compression: the client returned {len(trained)} arrays for a model of {len(model)}"
        )
    out = []
    for i, (new, old) in enumerate(zip(trained, model, strict=True)):
        if np.shape(new) != np.shape(old):
            raise ProtocolError(
                f"compression: array {i} has shape {np.shape(new)}, the model {np.shape(old)}"
            )
        out.append(np.subtract(new, old, dtype=np.float32))
    return out


def _residual(context: Context, size: int) -> np.ndarray | None:
    record = context.state.array_records.get(RESIDUAL_RECORD)
    if record is None:
        return None
    residual = record.get("0")
    if residual is None or residual.dtype != np.float32 or residual.shape != (size,):
        return None  # the model changed: start again without a residual
    return residual


def compression_mod(message: Message, context: Context, call_next: Handler) -> Message:
    """Decode the received model (downlink) and encode the update (uplink) of a fit task
    that asks for it; other messages pass through untouched."""
    ins = message.content
    if (
        message.metadata.message_type != MessageType.FIT
        or not isinstance(ins, FitIns)
        or TASK_RECORD not in ins.extras.config_records
    ):
        return call_next(message, context)
    try:
        codec, seed, downlink = codec_from_task(ins.extras.config_records[TASK_RECORD])
        model = decode_model(downlink, ins.extras) if downlink else ins.parameters.arrays
    except SerdeError as exc:
        raise ProtocolError(f"compression: {exc}") from None
    inner = replace(ins, parameters=ndarrays_to_parameters(model), extras=_without_ours(ins.extras))
    reply = call_next(Message(message.metadata, inner, message.error), context)
    res = reply.content
    if reply.error is not None or not isinstance(res, FitRes) or codec is None:
        return reply
    if LAYERS_RECORD in res.extras.config_records:
        return message.error_reply(
            "compression: a partial model reply cannot be encoded; compress full models only"
        )
    if PAYLOAD_RECORD in res.extras.array_records or PAYLOAD_RECORD in res.extras.config_records:
        return message.error_reply(
            f"compression: the reply already has a record {PAYLOAD_RECORD!r}"
        )
    layout = Layout.of(model, codec.min_size)
    compressed, raw = layout.split(_update(model, res.parameters.arrays))
    if codec.error_feedback:
        residual = _residual(context, compressed.size)
        if residual is not None:
            compressed += residual
        encoded, decoded = codec.roundtrip(compressed, layout.segments, context.rng, seed)
        compressed -= decoded
        context.state.array_records[RESIDUAL_RECORD] = {"0": compressed}
    else:
        encoded = codec.encode(compressed, layout.segments, context.rng, seed)
    records = encode_update(codec, layout, compressed, raw, encoded)
    extras = RecordDict(
        {**res.extras.array_records, **records.array_records},
        {**res.extras.config_records, **records.config_records},
        res.extras.metric_records,
    )
    out = replace(res, parameters=ndarrays_to_parameters([]), extras=extras)
    return Message(reply.metadata, out)


def with_compression_mod(mods: Sequence[Mod]) -> list[Mod]:
    """``mods`` with :func:`compression_mod` in front, unless it is among them already."""
    mods = list(mods)
    if compression_mod in mods:
        return mods
    return [compression_mod, *mods]
