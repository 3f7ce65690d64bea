"""The local training of each personalization method, for torch models.

Each function trains in place or on copies of plain arrays (the model's
``get_weights`` order) and draws minibatch order from a seeded generator, so a seeded
run is reproducible. The reference loop is :func:`fedhive.models.torch_models.train_torch`.

- FedAvg, fine-tuning, FedPer and FedBN train the whole model locally
  (:func:`train_full`); what differs is what is uploaded and what is kept.
- FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized
  Federated Learning"): the head first, with the body frozen, then the body with the
  head frozen (:func:`train_fedrep`).
- Ditto (Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning
  Through Personalization"): the personal model ``v`` minimises
  ``F(v) + lam / 2 ||v - w||^2`` for the global ``w`` (:func:`train_ditto_personal`).
  Each step is a gradient step on ``F`` followed by the proximal step of the penalty,
  ``v <- (v + lr lam w) / (1 + lr lam)``: the same minimiser as the gradient step on
  the sum, stable for every ``lam``, and ``lam = inf`` gives ``v = w`` exactly.
- APFL (Deng, Kamani, Mahdavi 2020, "Adaptive Personalized Federated Learning"): the
  local copy ``w`` of the global model, the personal ``v`` and the mixing weight
  ``alpha`` step together on each minibatch; the personalised model is
  ``alpha v + (1 - alpha) w`` (:func:`train_apfl`, :func:`mix`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Set
from typing import Any

import numpy as np

from fedhive.common.errors import MissingDependency
from fedhive.common.records import NDArrays
from fedhive.models.torch_models import evaluate_torch, get_weights, set_weights, train_torch
from fedhive.personalization.training import Info, TrainSettings, mix

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency("torch", "torch") from exc

__all__ = [
    "TorchTrainer",
    "TrainSettings",
    "mix",
    "train_apfl",
    "train_ditto_personal",
    "train_fedrep",
    "train_full",
]


def train_full(
    model: nn.Module,
    arrays: NDArrays,
    x: Any,
    y: Any,
    settings: TrainSettings,
    seed: int,
    *,
    epochs: int | None = None,
) -> tuple[NDArrays, Info]:
    """Load ``arrays``, train every layer, return the new arrays and the loop's info."""
    set_weights(model, arrays)
    info = train_torch(
        model,
        x,
        y,
        epochs=settings.epochs if epochs is None else epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        momentum=settings.momentum,
        seed=seed,
    )
    return get_weights(model), info


def _freeze(model: nn.Module, keys: Set[str], frozen: bool) -> None:
    for name, param in model.named_parameters():
        if name in keys:
            param.requires_grad_(not frozen)


def train_fedrep(
    model: nn.Module,
    arrays: NDArrays,
    head: Set[str],
    x: Any,
    y: Any,
    settings: TrainSettings,
    seed: int,
    head_epochs: int,
) -> tuple[NDArrays, Info]:
    """FedRep's local update: ``head_epochs`` on the head (parameter names ``head``)
    with the body frozen, then ``settings.epochs`` on the body with the head frozen."""
    set_weights(model, arrays)
    body = {name for name, _ in model.named_parameters() if name not in head}
    steps = 0
    try:
        _freeze(model, body, True)
        first = train_torch(
            model,
            x,
            y,
            epochs=head_epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            momentum=settings.momentum,
            seed=seed,
        )
        steps += int(first["num_steps"])
        _freeze(model, body, False)
        _freeze(model, head, True)
        info = train_torch(
            model,
            x,
            y,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            momentum=settings.momentum,
            seed=seed + 1,
        )
    finally:
        _freeze(model, body | head, False)
    info["num_steps"] = steps + int(info["num_steps"])
    return get_weights(model), info


def _batches(n: int, epochs: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs if n else 0):
        if batch_size <= 0:
            yield torch.arange(n)
            continue
        yield from torch.randperm(n, generator=generator).split(batch_size)


def _tensors(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xa = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(xa), torch.from_numpy(np.asarray(y).astype(np.int64))


def train_ditto_personal(
    model: nn.Module,
    personal: NDArrays,
    global_arrays: NDArrays,
    x: Any,
    y: Any,
    settings: TrainSettings,
    seed: int,
    *,
    lam: float,
    epochs: int,
) -> NDArrays:
    """Ditto's personal solver: ``epochs`` of proximal SGD on ``F(v) + lam/2 ||v - w||^2``
    from ``v = personal`` towards ``w = global_arrays``; returns the new ``v``."""
    if math.isinf(lam):
        return [np.array(a, copy=True) for a in global_arrays]
    set_weights(model, personal)
    keys = list(model.state_dict())
    anchor = {k: torch.as_tensor(np.asarray(a)) for k, a in zip(keys, global_arrays, strict=True)}
    params = list(model.named_parameters())
    xt, yt = _tensors(x, y)
    shrink = 1.0 / (1.0 + settings.lr * lam)
    was_training = model.training
    model.train()
    try:
        for index in _batches(len(yt), epochs, settings.batch_size, seed):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xt[index]), yt[index]).backward()
            with torch.no_grad():
                for name, p in params:
                    if p.grad is not None:
                        p.sub_(settings.lr * p.grad)
                    p.mul_(shrink).add_(anchor[name].to(p.dtype), alpha=1.0 - shrink)
    finally:
        model.train(was_training)
    return get_weights(model)


def train_apfl(
    model: nn.Module,
    local: NDArrays,
    personal: NDArrays,
    alpha: float,
    x: Any,
    y: Any,
    settings: TrainSettings,
    seed: int,
    *,
    alpha_lr: float,
) -> tuple[NDArrays, NDArrays, float, Info]:
    """One APFL local update: on each minibatch ``w -= lr grad F(w)``, then
    ``v -= lr alpha grad F(vbar)`` and ``alpha -= alpha_lr <v - w, grad F(vbar)>``
    (clipped to [0, 1]), ``vbar = alpha v + (1 - alpha) w``. Returns ``(w, v, alpha,
    info)``."""
    from torch.func import functional_call

    set_weights(model, local)
    keys = list(model.state_dict())
    names = [name for name, _ in model.named_parameters()]
    v = {
        k: torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=k in names)
        for k, a in zip(keys, personal, strict=True)
    }
    a = torch.tensor(float(alpha), requires_grad=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    xt, yt = _tensors(x, y)
    steps, seen, loss_sum = 0, 0, 0.0
    was_training = model.training
    model.train()
    try:
        for index in _batches(len(yt), settings.epochs, settings.batch_size, seed):
            xb, yb = xt[index], yt[index]
            optimizer.zero_grad(set_to_none=True)
            loss_w = nn.functional.cross_entropy(model(xb), yb)
            loss_w.backward()
            optimizer.step()
            w = {name: p.detach() for name, p in model.named_parameters()}
            mixed = {name: a * v[name] + (1 - a) * w[name] for name in names}
            buffers = {k: t for k, t in model.named_buffers()}
            out = functional_call(model, {**mixed, **buffers}, (xb,))
            loss = nn.functional.cross_entropy(out, yb)
            grads = torch.autograd.grad(loss, [v[name] for name in names] + [a])
            with torch.no_grad():
                for name, g in zip(names, grads[:-1], strict=True):
                    v[name].sub_(settings.lr * g)
                if alpha_lr > 0:
                    a.sub_(alpha_lr * grads[-1]).clamp_(0.0, 1.0)
            steps, seen = steps + 1, seen + len(index)
            loss_sum += float(loss.detach()) * len(index)
    finally:
        model.train(was_training)
    new_v = [
        v[k].detach().numpy().astype(np.asarray(p).dtype, copy=True)
        if k in names
        else np.array(p, copy=True)
        for k, p in zip(keys, personal, strict=True)
    ]
    info: dict[str, float | int] = {
        "loss": loss_sum / seen if seen else float("nan"),
        "num_steps": steps,
    }
    return get_weights(model), new_v, float(a.detach()), info


class TorchTrainer:
    """The :class:`~fedhive.personalization.training.Trainer` of torch modules: the
    functions above, every method."""

    methods = frozenset({"none", "finetune", "fedper", "fedrep", "fedbn", "ditto", "apfl"})

    def weights(self, model: nn.Module) -> NDArrays:
        return get_weights(model)

    def train(
        self,
        model: nn.Module,
        arrays: NDArrays,
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        *,
        epochs: int | None = None,
    ) -> tuple[NDArrays, Info]:
        return train_full(model, arrays, x, y, settings, seed, epochs=epochs)

    def train_fedrep(
        self,
        model: nn.Module,
        arrays: NDArrays,
        head: Set[str],
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        head_epochs: int,
    ) -> tuple[NDArrays, Info]:
        return train_fedrep(model, arrays, head, x, y, settings, seed, head_epochs)

    def train_ditto(
        self,
        model: nn.Module,
        personal: NDArrays,
        global_arrays: NDArrays,
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        *,
        lam: float,
        epochs: int,
    ) -> NDArrays:
        return train_ditto_personal(
            model, personal, global_arrays, x, y, settings, seed, lam=lam, epochs=epochs
        )

    def train_apfl(
        self,
        model: nn.Module,
        local: NDArrays,
        personal: NDArrays,
        alpha: float,
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        *,
        alpha_lr: float,
    ) -> tuple[NDArrays, NDArrays, float, Info]:
        return train_apfl(model, local, personal, alpha, x, y, settings, seed, alpha_lr=alpha_lr)

    def evaluate(self, model: nn.Module, arrays: NDArrays, x: Any, y: Any) -> tuple[float, float]:
        set_weights(model, arrays)
        loss, accuracy = evaluate_torch(model, x, y)
        return float(loss), float(accuracy)
