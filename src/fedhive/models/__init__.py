"""Models for simulations: numpy logistic regression and small PyTorch networks.

:mod:`fedhive.models.numpy_lr` needs only numpy. The PyTorch names (``MLP``, ``CNN1D``,
``get_weights``, ``set_weights``, ``train_torch``, ``evaluate_torch``, ``seeded_init``)
live in :mod:`fedhive.models.torch_models`, which is imported the first time one of
them is used here, so ``import fedhive.models`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedhive.models import numpy_lr

if TYPE_CHECKING:
    from fedhive.models import torch_models
    from fedhive.models.torch_models import (
        CNN1D,
        MLP,
        evaluate_torch,
        get_weights,
        seeded_init,
        set_weights,
        train_torch,
    )

__all__ = [
    "CNN1D",
    "MLP",
    "evaluate_torch",
    "get_weights",
    "numpy_lr",
    "seeded_init",
    "set_weights",
    "torch_models",
    "train_torch",
]

_TORCH_NAMES = frozenset(
    {"CNN1D", "MLP", "evaluate_torch", "get_weights", "seeded_init", "set_weights", "train_torch"}
)


def __getattr__(name: str) -> Any:
    """Import :mod:`fedhive.models.torch_models` on first use of one of its names."""
    if name == "torch_models" or name in _TORCH_NAMES:
        module = importlib.import_module("fedhive.models.torch_models")
        return module if name == "torch_models" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
