"""Client mods for differential privacy: clipping for the client-side DP wrappers, and
local DP.

A mod is ``mod(message, context, call_next) -> Message``; these act on fit replies only
and pass every other message through. They never modify the arrays they receive: the
reply carries new arrays. Integer layers come back as float64 (clipping and noise make
them fractional), which the server accepts as it does for FedAvg means.

- :func:`fixedclipping_mod` clips the update to the norm the server sent
  (``config["dp_clipping_norm"]``), for
  :class:`~fedhive.privacy.DifferentialPrivacyClientSideFixedClipping` (McMahan et al.
  2018, "Learning Differentially Private Recurrent Language Models").
- :func:`adaptiveclipping_mod` also reports whether the update was within the norm
  (``metrics["dp_norm_bit"]``), for
  :class:`~fedhive.privacy.DifferentialPrivacyClientSideAdaptiveClipping` (Andrew et al.
  2021, "Differentially Private Learning with Adaptive Clipping").
- :class:`LocalDpMod` clips and adds Gaussian noise on the client, so each update is
  (epsilon, delta)-DP before it leaves the device, whoever receives it (local DP).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from fedhive.client.context import Context
from fedhive.common.errors import ConfigError
from fedhive.common.message import Message, MessageType, derive_seed
from fedhive.common.records import (
    FitIns,
    FitRes,
    NDArray,
    NDArrays,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from fedhive.privacy.central import CLIPPING_NORM_KEY, NORM_BIT_KEY
from fedhive.privacy.clipping import clip_update, model_update
from fedhive.privacy.gaussian import analytic_gaussian_sigma
from fedhive.privacy.noise import NoiseSource, SecureGaussian, SeededGaussian

__all__ = ["LocalDpMod", "adaptiveclipping_mod", "fixedclipping_mod"]

log = logging.getLogger("fedhive.privacy")

Handler = Callable[[Message, Context], Message]
_LOCAL_RECORD = "dp.local"


def _float_dtype(array: NDArray) -> np.dtype[Any]:
    return array.dtype if array.dtype.kind == "f" else np.dtype(np.float64)


def _fit_pair(message: Message, reply: Message) -> tuple[FitIns, FitRes] | None:
    if message.metadata.message_type != MessageType.FIT or reply.error is not None:
        return None
    ins, res = message.content, reply.content
    if not isinstance(ins, FitIns) or not isinstance(res, FitRes):
        return None
    return ins, res


def _with_update(
    reply: Message, res: FitRes, reference: NDArrays, update: NDArrays, metrics: dict[str, Scalar]
) -> Message:
    new = [
        (ref + upd).astype(_float_dtype(out))
        for ref, upd, out in zip(
            reference, update, parameters_to_ndarrays(res.parameters), strict=True
        )
    ]
    content = dataclasses.replace(res, parameters=ndarrays_to_parameters(new), metrics=metrics)
    return dataclasses.replace(reply, content=content)  # extras kept


def _server_clipping_norm(ins: FitIns) -> float:
    value = ins.config.get(CLIPPING_NORM_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            f"the fit config has no positive {CLIPPING_NORM_KEY!r} (got {value!r}): client-side "
            "clipping mods need a DifferentialPrivacyClientSide* strategy on the server"
        )
    return float(value)


def _clip_reply(
    message: Message, context: Context, call_next: Handler, report_bit: bool
) -> Message:
    if message.metadata.message_type != MessageType.FIT or not isinstance(message.content, FitIns):
        return call_next(message, context)
    clipping_norm = _server_clipping_norm(message.content)
    reply = call_next(message, context)
    pair = _fit_pair(message, reply)
    if pair is None:
        return reply
    ins, res = pair
    reference = parameters_to_ndarrays(ins.parameters)
    update, norm = clip_update(
        model_update(parameters_to_ndarrays(res.parameters), reference), clipping_norm
    )
    metrics = dict(res.metrics)
    if report_bit:
        metrics[NORM_BIT_KEY] = int(norm <= clipping_norm)
    return _with_update(reply, res, reference, update, metrics)


def fixedclipping_mod(message: Message, context: Context, call_next: Handler) -> Message:
    """Clip this client's update to the server's clip norm (client-side fixed clipping)."""
    return _clip_reply(message, context, call_next, report_bit=False)


def adaptiveclipping_mod(message: Message, context: Context, call_next: Handler) -> Message:
    """Clip to the server's norm and report ``dp_norm_bit`` (1 if no clipping was needed)."""
    return _clip_reply(message, context, call_next, report_bit=True)


class LocalDpMod:
    """Local DP: clip each update to ``clipping_norm`` and add calibrated Gaussian noise.

    Any two clipped updates differ by at most ``2 * clipping_norm`` (the diameter of the
    ball), which is the sensitivity used: every update this client sends is
    (``epsilon``, ``delta``)-DP with respect to its whole local data set. The noise std is
    the analytic Gaussian mechanism's (Balle & Wang 2018, "Improving the Gaussian
    Mechanism for Differential Privacy"), valid for every epsilon > 0. Noise comes from
    the secure source; ``noise_seed`` (tests only) derives it from (seed, round, client)
    and marks the reply ``dp_not_private``. The number of releases by this client is kept
    in its persistent state and reported as ``dp_local_releases`` (each costs epsilon).

    Example::

        app = ClientApp(client_fn, mods=[LocalDpMod(clipping_norm=1.0, epsilon=2.0, delta=1e-5)])
    """

    def __init__(
        self, clipping_norm: float, epsilon: float, delta: float, *, noise_seed: int | None = None
    ) -> None:
        if isinstance(clipping_norm, bool) or not isinstance(clipping_norm, int | float):
            raise ConfigError(f"clipping_norm must be a positive number, got {clipping_norm!r}")
        if not 0 < clipping_norm < float("inf"):
            raise ConfigError(f"clipping_norm must be a positive number, got {clipping_norm!r}")
        if noise_seed is not None and (
            isinstance(noise_seed, bool) or not isinstance(noise_seed, int)
        ):
            raise ConfigError(f"noise_seed must be an int or None, got {noise_seed!r}")
        self.clipping_norm = float(clipping_norm)
        self.epsilon = epsilon
        self.delta = delta
        self.noise_seed = noise_seed
        self.stddev = analytic_gaussian_sigma(epsilon, delta, sensitivity=2.0 * self.clipping_norm)
        if noise_seed is not None:
            log.warning(
                "LocalDpMod: noise_seed=%d makes the noise replayable; NOT private "
                "(replies carry dp_not_private=True). Use it for tests only.",
                noise_seed,
            )

    def __repr__(self) -> str:
        return (
            f"LocalDpMod(clipping_norm={self.clipping_norm}, epsilon={self.epsilon}, "
            f"delta={self.delta})"
        )

    def _noise(self, message: Message) -> NoiseSource:
        if self.noise_seed is None:
            return SecureGaussian()
        meta = message.metadata
        return SeededGaussian(
            derive_seed(self.noise_seed, meta.server_round, meta.node_id, "local-dp-noise")
        )

    def __call__(self, message: Message, context: Context, call_next: Handler) -> Message:
        reply = call_next(message, context)
        pair = _fit_pair(message, reply)
        if pair is None:
            return reply
        ins, res = pair
        reference = parameters_to_ndarrays(ins.parameters)
        update, _ = clip_update(
            model_update(parameters_to_ndarrays(res.parameters), reference), self.clipping_norm
        )
        noise = self._noise(message)
        for arr in update:
            arr += self.stddev * noise.standard_normal(arr.shape)
        record = context.state.metric_records.setdefault(_LOCAL_RECORD, {"releases": 0})
        record["releases"] = int(record["releases"]) + 1
        metrics: dict[str, Scalar] = {
            **res.metrics,
            "dp_local_epsilon": float(self.epsilon),
            "dp_local_delta": float(self.delta),
            "dp_local_noise_stddev": self.stddev,
            "dp_local_releases": int(record["releases"]),
        }
        if self.noise_seed is not None:
            metrics["dp_not_private"] = True
        return _with_update(reply, res, reference, update, metrics)
