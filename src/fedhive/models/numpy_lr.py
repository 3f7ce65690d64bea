"""Multinomial logistic regression in pure numpy (no torch needed).

Parameters are ``[W, b]`` with ``W`` of shape ``(dim, num_classes)`` and ``b`` of shape
``(num_classes,)``; inputs are flattened to ``(n, dim)``. The loss is the mean
cross-entropy of ``softmax(x @ W + b)``, plus ``l2 / 2 * ||W||^2`` when ``l2 > 0``.

:func:`train` runs local minibatch SGD (optionally with heavy-ball momentum) as a client of
FedAvg does (McMahan et al. 2017), with FedProx's proximal term
``mu / 2 * ||w - w_global||^2`` (Li et al. 2020); ``batch_size <= 0`` takes full-batch
steps (FedSGD). Computation is in float64; returned arrays keep the input dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from fedhive.common.errors import ConfigError
from fedhive.common.records import NDArray, NDArrays

__all__ = [
    "evaluate",
    "init_params",
    "loss_and_grad",
    "predict",
    "predict_proba",
    "train",
]

Float64 = npt.NDArray[np.float64]


def init_params(
    dim: int, num_classes: int, seed: int, scale: float = 0.01, dtype: Any = np.float32
) -> NDArrays:
    """``[W, b]``: ``W ~ N(0, scale^2)`` of shape ``(dim, num_classes)``, ``b = 0``."""
    if dim < 1 or num_classes < 2:
        raise ConfigError(f"need dim >= 1 and num_classes >= 2, got {dim} and {num_classes}")
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, scale, size=(dim, num_classes)).astype(dtype)
    return [weights, np.zeros(num_classes, dtype=dtype)]


# --------------------------------------------------------------------------- checks


def _unpack(params: NDArrays) -> tuple[Float64, Float64]:
    if len(params) != 2:
        raise ConfigError(f"expected params [W, b], got {len(params)} arrays")
    weights = np.asarray(params[0], dtype=np.float64)
    bias = np.asarray(params[1], dtype=np.float64)
    if weights.ndim != 2 or bias.shape != (weights.shape[1],):
        raise ConfigError(
            f"expected W of shape (dim, C) and b of shape (C,), got {weights.shape} and "
            f"{bias.shape}"
        )
    return weights, bias


def _features(x: npt.ArrayLike, dim: int) -> Float64:
    arr = np.asarray(x, dtype=np.float64)
    arr = arr.reshape(arr.shape[0], -1) if arr.ndim != 2 else arr
    if arr.shape[1] != dim:
        raise ConfigError(f"inputs have {arr.shape[1]} features but the model expects {dim}")
    return arr


def _labels(y: npt.ArrayLike, n: int, num_classes: int) -> npt.NDArray[np.int64]:
    arr = np.asarray(y)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"expected {n} integer labels, got shape {arr.shape} ({arr.dtype})")
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes})")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------- math


def _log_softmax(logits: Float64) -> Float64:
    shifted = logits - logits.max(axis=1, keepdims=True)
    result: Float64 = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return result


def _loss_grad64(
    weights: Float64, bias: Float64, x: Float64, y: npt.NDArray[np.int64], l2: float
) -> tuple[float, Float64, Float64]:
    """Mean cross-entropy (+ L2 on W) and its gradients, all float64."""
    n = x.shape[0]
    log_p = _log_softmax(x @ weights + bias)
    loss = -float(log_p[np.arange(n), y].mean()) + 0.5 * l2 * float(np.sum(weights**2))
    delta = np.exp(log_p)
    delta[np.arange(n), y] -= 1.0
    delta /= n
    return loss, x.T @ delta + l2 * weights, delta.sum(axis=0)


def loss_and_grad(
    params: NDArrays, x: npt.ArrayLike, y: npt.ArrayLike, l2: float = 0.0
) -> tuple[float, NDArrays]:
    """Mean cross-entropy loss (``+ l2/2 ||W||^2``) and gradients ``[dW, db]``."""
    weights, bias = _unpack(params)
    feats = _features(x, weights.shape[0])
    if feats.shape[0] == 0:
        raise ConfigError("cannot compute a loss on zero samples")
    labels = _labels(y, feats.shape[0], weights.shape[1])
    loss, grad_w, grad_b = _loss_grad64(weights, bias, feats, labels, l2)
    return loss, [grad_w.astype(params[0].dtype), grad_b.astype(params[1].dtype)]


def predict_proba(params: NDArrays, x: npt.ArrayLike) -> Float64:
    """Class probabilities, shape ``(n, num_classes)``."""
    weights, bias = _unpack(params)
    return np.exp(_log_softmax(_features(x, weights.shape[0]) @ weights + bias))


def predict(params: NDArrays, x: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Most likely class of each sample."""
    weights, bias = _unpack(params)
    logits = _features(x, weights.shape[0]) @ weights + bias
    return np.argmax(logits, axis=1).astype(np.int64)


def evaluate(params: NDArrays, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` on ``(x, y)``."""
    weights, bias = _unpack(params)
    feats = _features(x, weights.shape[0])
    if feats.shape[0] == 0:
        raise ConfigError("cannot evaluate on zero samples")
    labels = _labels(y, feats.shape[0], weights.shape[1])
    log_p = _log_softmax(feats @ weights + bias)
    loss = -float(log_p[np.arange(len(labels)), labels].mean())
    accuracy = float(np.mean(np.argmax(log_p, axis=1) == labels))
    return loss, accuracy


# --------------------------------------------------------------------------- training


def _check_train_args(
    epochs: int, lr: float, momentum: float, proximal_mu: float, max_steps: int | None
) -> None:
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
    if not proximal_mu >= 0:
        raise ConfigError(f"proximal_mu must be >= 0, got {proximal_mu}")
    if max_steps is not None and max_steps < 0:
        raise ConfigError(f"max_steps must be >= 0 or None, got {max_steps}")


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[npt.NDArray[np.int64]]:
    """One epoch of minibatch indices (shuffled); the whole set when ``batch_size <= 0``."""
    if batch_size <= 0:
        return [np.arange(n)]
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _schedule(
    n: int, epochs: int, batch_size: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.int64]]:
    """Minibatches of ``epochs`` passes over ``n`` samples (nothing when ``n == 0``)."""
    for _ in range(epochs if n else 0):
        yield from _batches(n, batch_size, rng)


def _momentum_step(
    state: list[Float64],
    velocity: list[Float64],
    grads: list[Float64],
    *,
    lr: float,
    momentum: float,
) -> None:
    """In place: ``v <- momentum * v + g``, ``w <- w - lr * v``."""
    for i, grad in enumerate(grads):
        velocity[i] = momentum * velocity[i] + grad
        state[i] = state[i] - lr * velocity[i]


def _correction(
    correction: NDArrays | None, weights: Float64, bias: Float64
) -> list[Float64] | None:
    if correction is None:
        return None
    if len(correction) != 2:
        raise ConfigError(f"correction must be [dW, db], got {len(correction)} arrays")
    shift = [np.asarray(c, dtype=np.float64) for c in correction]
    if shift[0].shape != weights.shape or shift[1].shape != bias.shape:
        raise ConfigError(
            f"correction shapes {[c.shape for c in shift]} differ from the model's "
            f"{[weights.shape, bias.shape]}"
        )
    return shift


def train(
    params: NDArrays,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    proximal_mu: float = 0.0,
    global_params: NDArrays | None = None,
    max_steps: int | None = None,
    l2: float = 0.0,
    correction: NDArrays | None = None,
) -> tuple[NDArrays, dict[str, float | int]]:
    """Local SGD on ``(x, y)`` starting from ``params`` (which are not modified).

    Each epoch visits the samples in a fresh order drawn from
    ``np.random.default_rng(seed)``; the last minibatch may be smaller. ``batch_size <= 0``
    means one full-batch step per epoch (FedSGD, McMahan et al. 2017). ``momentum`` is
    heavy-ball momentum (``v <- m v + g; w <- w - lr v``) with a fresh buffer per call.
    ``proximal_mu > 0`` adds FedProx's ``mu/2 ||w - w_global||^2`` (Li et al. 2020) where
    ``w_global`` is ``global_params``, by default the starting ``params``. Training stops
    after ``max_steps`` steps if given (partial local work, as FedProx allows).
    ``correction`` (``[dW, db]``) is added to every gradient: SCAFFOLD's ``c - c_i``
    (Karimireddy et al. 2020; see ``fedhive.client.mods.scaffold_correction``).

    Returns:
        The new ``[W, b]`` (input dtypes) and ``{"loss": mean minibatch loss,
        "num_examples": len(x) (the FedAvg weight), "num_examples_seen": samples processed,
        "num_steps": optimizer steps}``.
    """
    _check_train_args(epochs, lr, momentum, proximal_mu, max_steps)
    weights, bias = _unpack(params)
    feats = _features(x, weights.shape[0])
    labels = _labels(y, feats.shape[0], weights.shape[1])
    anchor = _unpack(global_params) if global_params is not None else (weights, bias)
    if anchor[0].shape != weights.shape or anchor[1].shape != bias.shape:
        raise ConfigError("global_params must have the same shapes as params")
    shift = _correction(correction, weights, bias)
    state = [weights.copy(), bias.copy()]
    velocity = [np.zeros_like(weights), np.zeros_like(bias)]
    steps, seen, loss_sum = 0, 0, 0.0
    batches = _schedule(feats.shape[0], epochs, batch_size, np.random.default_rng(seed))
    for batch in itertools.islice(batches, max_steps):
        loss, grad_w, grad_b = _loss_grad64(state[0], state[1], feats[batch], labels[batch], l2)
        grads = [grad_w, grad_b]
        if proximal_mu > 0:
            pull = zip(grads, state, anchor, strict=True)
            grads = [g + proximal_mu * (w - a) for g, w, a in pull]
        if shift is not None:
            grads = [g + s for g, s in zip(grads, shift, strict=True)]
        _momentum_step(state, velocity, grads, lr=lr, momentum=momentum)
        steps, seen, loss_sum = steps + 1, seen + len(batch), loss_sum + loss
    new_params: list[NDArray] = [state[0].astype(params[0].dtype), state[1].astype(params[1].dtype)]
    info: dict[str, float | int] = {
        "loss": loss_sum / steps if steps else float("nan"),
        "num_examples": int(feats.shape[0]),
        "num_examples_seen": int(seen),
        "num_steps": int(steps),
    }
    return new_params, info
