"""Small PyTorch models and the local train / evaluate loops of simulated clients.

Importing this module imports torch (raises :class:`MissingDependency` if torch is not
installed); ``fedhive.models`` imports it only when one of its names is first used.

No global torch state is changed: model initialisation with ``seed`` runs inside
:func:`torch.random.fork_rng`, and minibatch order comes from a seeded
:class:`torch.Generator`. The number of intra-op threads (``torch.set_num_threads``) is
left to the caller. Models with dropout draw their masks from torch's global RNG.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from fedhive.common.errors import ConfigError, MissingDependency
from fedhive.common.records import NDArrays

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency("torch", "torch") from exc

__all__ = [
    "CNN1D",
    "MLP",
    "evaluate_torch",
    "get_weights",
    "seeded_init",
    "set_weights",
    "train_torch",
]

T = TypeVar("T")


def seeded_init(build: Callable[[], T], seed: int | None) -> T:
    """Call ``build()`` with torch's CPU RNG seeded by ``seed``, then restore the RNG.

    ``seed=None`` builds with the global RNG as it is (and advances it).
    """
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """A multilayer perceptron with ReLU activations; inputs are flattened.

    ``hidden`` is one width or a sequence of widths (``()`` gives logistic regression).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int | Sequence[int] = 64,
        num_classes: int = 10,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if in_dim < 1 or num_classes < 2 or any(w < 1 for w in widths):
            raise ConfigError(
                f"MLP needs in_dim >= 1, num_classes >= 2 and widths >= 1, "
                f"got {in_dim}, {num_classes}, {widths}"
            )
        self.net = seeded_init(lambda: _mlp_layers(in_dim, widths, num_classes), seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x.flatten(1))
        return out


def _mlp_layers(in_dim: int, widths: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise([in_dim, *widths]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(([in_dim, *widths])[-1], num_classes))
    return nn.Sequential(*layers)


class CNN1D(nn.Module):
    """A small 1-D convolutional network for MNIST-1D (Greydanus 2020).

    Three ``kernel_size=5`` convolutions with ``channels`` filters, stride 2 and ReLU (length
    40 -> 20 -> 10 -> 5), then one linear layer. Accepts inputs of shape ``(n, length)``
    or ``(n, 1, length)``. About 10k parameters with the defaults; no buffers.
    ``batch_norm=True`` puts a ``BatchNorm1d`` after each convolution (parameters and
    running statistics: what FedBN keeps local).
    """

    def __init__(
        self,
        num_classes: int = 10,
        length: int = 40,
        channels: int = 32,
        *,
        seed: int | None = None,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2 or length < 8 or channels < 1:
            raise ConfigError(
                f"CNN1D needs num_classes >= 2, length >= 8 and channels >= 1, "
                f"got {num_classes}, {length}, {channels}"
            )
        self.length = length
        self.features, self.head = seeded_init(
            lambda: _cnn_layers(num_classes, length, channels, batch_norm), seed
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        out: torch.Tensor = self.head(self.features(x).flatten(1))
        return out


def _conv_out(length: int) -> int:
    """Output length of a kernel-5, stride-2, padding-2 convolution."""
    return (length - 1) // 2 + 1


def _cnn_layers(
    num_classes: int, length: int, channels: int, batch_norm: bool = False
) -> tuple[nn.Sequential, nn.Linear]:
    layers: list[nn.Module] = []
    for c_in in (1, channels, channels):
        layers.append(nn.Conv1d(c_in, channels, kernel_size=5, stride=2, padding=2))
        if batch_norm:
            layers.append(nn.BatchNorm1d(channels))
        layers.append(nn.ReLU())
    features = nn.Sequential(*layers)
    out_len = _conv_out(_conv_out(_conv_out(length)))
    return features, nn.Linear(channels * out_len, num_classes)


# --------------------------------------------------------------------------- weights


def get_weights(model: nn.Module) -> NDArrays:
    """The model's ``state_dict`` values (parameters and buffers) as numpy copies, in order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, arrays: Sequence[npt.ArrayLike]) -> None:
    """Load ``arrays`` (in :func:`get_weights` order) into ``model``.

    Raises:
        ConfigError: when the number of arrays or any shape differs from the model's.
    """
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ConfigError(
            f"model has {len(state)} weight tensors but {len(arrays)} arrays were given"
        )
    new_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (key, current), value in zip(state.items(), arrays, strict=True):
        array = np.asarray(value)
        if tuple(array.shape) != tuple(current.shape):
            raise ConfigError(
                f"weight {key!r} has shape {tuple(current.shape)} "
                f"but the array given has shape {tuple(array.shape)}"
            )
        new_state[key] = torch.as_tensor(array).to(dtype=current.dtype, device=current.device)
    model.load_state_dict(new_state, strict=True)


# --------------------------------------------------------------------------- train / eval


def _device_of(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _as_tensors(
    x: npt.ArrayLike, y: npt.ArrayLike, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    xa = np.ascontiguousarray(x, dtype=np.float32)
    ya = np.asarray(y)
    if ya.ndim != 1 or xa.ndim < 1 or xa.shape[0] != ya.shape[0]:
        raise ConfigError(f"x has shape {xa.shape} but y has shape {ya.shape}")
    if ya.size and not np.issubdtype(ya.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {ya.dtype}")
    return torch.from_numpy(xa).to(device), torch.from_numpy(ya.astype(np.int64)).to(device)


def _check_train_args(epochs: int, lr: float, momentum: float, proximal_mu: float) -> None:
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
    if not proximal_mu >= 0:
        raise ConfigError(f"proximal_mu must be >= 0, got {proximal_mu}")


def _minibatches(
    n: int, epochs: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index tensors of ``epochs`` shuffled passes; one full batch per epoch if ``<= 0``."""
    for _ in range(epochs if n else 0):
        if batch_size <= 0:
            yield torch.arange(n)
            continue
        order = torch.randperm(n, generator=generator)
        yield from order.split(batch_size)


def _proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """``sum ||w - w_global||^2`` over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    terms = [torch.sum((p - a) ** 2) for p, a in zip(params, anchor, strict=True)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _sgd_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    xt: torch.Tensor,
    yt: torch.Tensor,
    batches: Iterator[torch.Tensor],
    *,
    proximal_mu: float,
    anchor: list[torch.Tensor],
    shift: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[int, int, float]:
    """Run the optimizer over ``batches``; returns (steps, samples seen, summed loss)."""
    steps, seen, loss_sum = 0, 0, 0.0
    for index in batches:
        batch = index.to(xt.device)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
        total = loss + 0.5 * proximal_mu * _proximal_term(model, anchor) if proximal_mu else loss
        total.backward()
        for param, extra in shift:
            if param.grad is None:
                param.grad = extra.clone()
            else:
                param.grad.add_(extra)
        optimizer.step()
        steps, seen = steps + 1, seen + len(batch)
        loss_sum += float(loss.detach()) * len(batch)
    return steps, seen, loss_sum


def _gradient_shift(
    model: nn.Module, correction: Sequence[npt.ArrayLike] | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(trainable parameter, tensor added to its gradient) pairs from ``correction``."""
    if correction is None:
        return []
    entries = model.state_dict(keep_vars=True)
    if len(correction) != len(entries):
        raise ConfigError(
            f"correction has {len(correction)} arrays but the model has {len(entries)} "
            "weight tensors (one per get_weights entry)"
        )
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for (key, tensor), value in zip(entries.items(), correction, strict=True):
        array = np.asarray(value)
        if tuple(array.shape) != tuple(tensor.shape):
            raise ConfigError(
                f"correction for {key!r} has shape {array.shape}, expected {tuple(tensor.shape)}"
            )
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            extra = torch.as_tensor(array).to(dtype=tensor.dtype, device=tensor.device)
            pairs.append((tensor, extra))
    return pairs


def train_torch(
    model: nn.Module,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    proximal_mu: float = 0.0,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    correction: Sequence[npt.ArrayLike] | None = None,
) -> dict[str, float | int]:
    """Train ``model`` in place with SGD and cross-entropy on ``(x, y)``.

    A fresh :class:`torch.optim.SGD` (so a fresh momentum buffer) is made per call, as a
    FedAvg client does per round (McMahan et al. 2017). Minibatch order comes from a
    :class:`torch.Generator` seeded with ``seed``; ``batch_size <= 0`` takes one
    full-batch step per epoch (FedSGD). ``proximal_mu > 0`` adds FedProx's
    ``mu/2 ||w - w_global||^2`` with ``w_global`` the weights at the start of the call
    (Li et al. 2020). Training stops after ``max_steps`` steps if given. ``correction``
    (one array per :func:`get_weights` entry) is added to the gradient of every trainable
    parameter at every step, SCAFFOLD's ``c - c_i`` (Karimireddy et al. 2020); entries for
    buffers are ignored.

    Returns:
        ``{"loss": mean cross-entropy over the samples seen, "num_examples": len(x)
        (the FedAvg weight), "num_examples_seen": samples processed, "num_steps": steps}``.
    """
    _check_train_args(epochs, lr, momentum, proximal_mu)
    xt, yt = _as_tensors(x, y, _device_of(model))
    batches = _minibatches(len(yt), epochs, batch_size, torch.Generator().manual_seed(seed))
    batches = itertools.islice(batches, max_steps)
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    shift = _gradient_shift(model, correction)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    was_training = model.training
    model.train()
    try:
        steps, seen, loss_sum = _sgd_loop(
            model,
            optimizer,
            xt,
            yt,
            batches,
            proximal_mu=proximal_mu,
            anchor=anchor,
            shift=shift,
        )
    finally:
        model.train(was_training)
    return {
        "loss": loss_sum / seen if seen else float("nan"),
        "num_examples": len(yt),
        "num_examples_seen": int(seen),
        "num_steps": int(steps),
    }


def evaluate_torch(
    model: nn.Module, x: npt.ArrayLike, y: npt.ArrayLike, batch_size: int = 1024
) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``(x, y)``, in eval mode."""
    xt, yt = _as_tensors(x, y, _device_of(model))
    if len(yt) == 0:
        raise ConfigError("cannot evaluate on zero samples")
    step = batch_size if batch_size > 0 else len(yt)
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(yt), step):
                logits = model(xt[start : start + step])
                target = yt[start : start + step]
                loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return loss_sum / len(yt), correct / len(yt)
