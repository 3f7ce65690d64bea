"""The client side of SCAFFOLD (Karimireddy et al. 2020, Option II control variates).

It lives beside the server side (:class:`~fedhive.server.strategy.Scaffold`), whose traits
name it as a required client mod; ``fedhive.client.mods`` re-exports it, which is where
users import it from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from fedhive.common.context import Context, Handler
from fedhive.common.errors import ProtocolError
from fedhive.common.message import Message, MessageType
from fedhive.common.records import (
    Config,
    FitIns,
    FitRes,
    NDArray,
    NDArrays,
    RecordDict,
    Scalar,
)

__all__ = ["SCAFFOLD_STATE", "scaffold_correction", "scaffold_mod"]

#: Record of ``context.state.array_records`` holding the client's control variate ``c_i``;
#: also the name of the ``extras`` array record SCAFFOLD's messages carry (the server
#: variate ``c`` in ``FitIns.extras``, ``delta c_i`` in ``FitRes.extras``).
SCAFFOLD_STATE = "scaffold"
#: Record holding ``c - c_i`` while the client trains (removed afterwards).
_CORRECTION = "scaffold.correction"


def scaffold_correction(context: Context) -> NDArrays | None:
    """The gradient correction ``c - c_i`` for this fit, or ``None`` outside SCAFFOLD.

    A client's training loop adds it to every gradient (``g + c - c_i``); the reference
    loops take it as ``correction=`` (``fedhive.models.numpy_lr.train``,
    ``fedhive.models.torch_models.train_torch``). One float64 array per model array.
    """
    record = context.state.array_records.get(_CORRECTION)
    if record is None:
        return None
    return [record[str(i)] for i in range(len(record))]


def _layer_dtype(reference: NDArray) -> np.dtype[np.floating]:
    return reference.dtype if reference.dtype.kind == "f" else np.dtype(np.float64)


def _number(value: Scalar | None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _server_variate(ins: FitIns) -> NDArrays:
    """The server variate ``c`` from ``ins.extras``, checked against the model's layout."""
    model = ins.parameters.arrays
    record = ins.extras.array_records.get(SCAFFOLD_STATE)
    if record is None:
        raise ProtocolError(
            f"a SCAFFOLD fit carries the server control variate in the extras array record "
            f"{SCAFFOLD_STATE!r}; this one has none (extras: {ins.extras!r})"
        )
    expected = [str(i) for i in range(len(model))]
    variate = [np.asarray(c) for c in record.values()]
    if list(record) != expected or [np.shape(c) for c in variate] != [a.shape for a in model]:
        raise ProtocolError(
            f"the SCAFFOLD server variate must hold one array per model array, named 0, 1, "
            f"... with the model's shapes {[a.shape for a in model]}; got "
            f"{[(k, np.shape(c)) for k, c in record.items()]}"
        )
    for i, c in enumerate(variate):
        # It goes into every gradient and into the stored c_i: refuse it before training.
        if c.dtype.kind not in "biuf" or not np.isfinite(c).all():
            raise ProtocolError(
                f"the SCAFFOLD server variate's array {i} must be finite numbers, got "
                f"dtype {c.dtype} with NaN/Inf or non-numeric values"
            )
    return variate


def _own_variate(context: Context, model: NDArrays) -> NDArrays:
    record = context.state.array_records.get(SCAFFOLD_STATE)
    if record is None:
        return [np.zeros(a.shape, np.float64) for a in model]
    variate = [np.asarray(record[str(i)], np.float64) for i in range(len(record))]
    if [v.shape for v in variate] != [a.shape for a in model]:
        raise ProtocolError(
            "the stored SCAFFOLD control variate does not match the model's layout; the "
            "model changed since this client last trained"
        )
    return variate


def _new_variate(
    own: NDArrays, server: NDArrays, x: NDArrays, y: Sequence[NDArray], steps: float, lr: float
) -> NDArrays:
    """Option II: ``c_i+ = c_i - c + (x - y_i) / (K lr)``; unchanged when no step was taken."""
    if steps == 0:
        return own
    scale = 1.0 / (steps * lr)
    return [
        ci - np.asarray(c, np.float64) + scale * (np.asarray(a, np.float64) - b)
        for ci, c, a, b in zip(own, server, x, y, strict=True)
    ]


def _steps_and_lr(res: FitRes, config: Config) -> tuple[float, float]:
    steps = _number(res.metrics.get("num_steps"))
    lr = _number(res.metrics.get("lr", config.get("lr")))
    if steps is None or steps < 0:
        raise ProtocolError(
            "SCAFFOLD needs the number of local steps as fit metric 'num_steps' "
            f"(a number >= 0), got {res.metrics.get('num_steps')!r}"
        )
    if lr is None or lr <= 0:
        raise ProtocolError(
            "SCAFFOLD needs the local learning rate as fit metric 'lr' or fit config 'lr' "
            "(a number > 0)"
        )
    return steps, lr


def scaffold_mod(message: Message, context: Context, call_next: Handler) -> Message:
    """The client side of SCAFFOLD: pass it in ``mods=[scaffold_mod]``.

    Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled
    Averaging for Federated Learning." ICML 2020.

    For a fit with config ``"scaffold": True`` it takes the server variate ``c`` from the
    instruction's extras (array record ``"scaffold"``; the client sees only the model
    ``x``), exposes ``c - c_i`` through :func:`scaffold_correction` while the client
    trains, then computes ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (Option II) from the
    reply's ``"num_steps"`` metric ``K`` and the learning rate (metric ``"lr"``, else
    config ``"lr"``), stores ``c_i+`` in ``context.state`` (record ``"scaffold"``, float64)
    and puts ``c_i+ - c_i``, in the model's float dtypes, in the reply's extras (array
    record ``"scaffold"``, arrays ``"0"``, ``"1"``, ...). Other messages pass through
    untouched.
    """
    ins = message.content
    if (
        message.metadata.message_type != MessageType.FIT
        or not isinstance(ins, FitIns)
        or not ins.config.get("scaffold")
    ):
        return call_next(message, context)
    x = ins.parameters.arrays
    c = _server_variate(ins)
    own = _own_variate(context, x)
    context.state.array_records[_CORRECTION] = {
        str(i): np.asarray(ci_server, np.float64) - ci
        for i, (ci_server, ci) in enumerate(zip(c, own, strict=True))
    }
    rest = {k: v for k, v in ins.extras.array_records.items() if k != SCAFFOLD_STATE}
    extras = RecordDict(rest, ins.extras.config_records, ins.extras.metric_records)
    task = Message(
        message.metadata,
        replace(ins, config=dict(ins.config), extras=extras),
        message.error,
    )
    try:
        reply = call_next(task, context)
    finally:
        context.state.array_records.pop(_CORRECTION, None)
    res = reply.content
    if reply.error is not None or not isinstance(res, FitRes):
        return reply
    y = res.parameters.arrays
    if len(y) != len(x):
        return message.error_reply(
            f"SCAFFOLD: the client returned {len(y)} arrays for a model of {len(x)}"
        )
    if SCAFFOLD_STATE in res.extras.array_records:
        return message.error_reply(
            f"SCAFFOLD: the client's reply already has an extras record {SCAFFOLD_STATE!r}, "
            "which is reserved for scaffold_mod's control-variate delta"
        )
    steps, lr = _steps_and_lr(res, ins.config)
    new = _new_variate(own, c, x, y, steps, lr)
    context.state.array_records[SCAFFOLD_STATE] = {str(i): v for i, v in enumerate(new)}
    delta = {
        str(i): (n - o).astype(_layer_dtype(a))
        for i, (n, o, a) in enumerate(zip(new, own, x, strict=True))
    }
    out_extras = RecordDict(
        {**res.extras.array_records, SCAFFOLD_STATE: delta},
        res.extras.config_records,
        res.extras.metric_records,
    )
    return Message(reply.metadata, replace(res, extras=out_extras))
