"""``[personalization]`` in ``fedhive run``: the table, and the clients it builds.

Example::

    [personalization]
    method = "fedper"
    personal_layers = ["head"]
    test_fraction = 0.2      # each client's own test split
    eval_clients = 0         # evaluate every client each round (also never-sampled ones)

With the table, every client's data is cut into train, validation and test parts
(``data.val_fraction``, ``test_fraction``), the server holds only the shared layers, and
each evaluated round of ``history.json`` gets ``personalized`` and ``global`` summaries
(also for ``method = "none"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedhive.common.atomic import atomic_write_bytes
from fedhive.common.errors import ConfigError
from fedhive.common.records import NDArrays
from fedhive.personalization import PersonalizationConfig, SharedSplit, report

if TYPE_CHECKING:
    from fedhive.client.context import Context
    from fedhive.data import Partition
    from fedhive.data.partition import ClientSplit
    from fedhive.personalization.client import PersonalizedTorchClient
    from fedhive.server.history import History

__all__ = [
    "PersonalClientFactory",
    "format_report",
    "PersonalizationSection",
    "personal_clients",
    "write_report",
]


class PersonalizationSection(BaseModel):
    """The ``[personalization]`` table; the keys of
    :class:`fedhive.personalization.PersonalizationConfig`, which checks them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["none", "finetune", "fedper", "fedrep", "fedbn", "ditto", "apfl"] = "none"
    personal_layers: list[str] = Field(default_factory=list)
    personal_types: list[str] = Field(default_factory=list)
    lam: float = Field(1.0, ge=0, description="Ditto's lambda (inf: the global model)")
    finetune_epochs: int = Field(1, ge=0)
    finetune_head: list[str] = Field(
        default_factory=list, description="layers fine-tuned first, alone (LP-FT)"
    )
    finetune_head_epochs: int = Field(0, ge=0, description="epochs on finetune_head first")
    head_epochs: int = Field(2, ge=0, description="FedRep's epochs on the head")
    personal_epochs: int | None = Field(None, ge=0, description="Ditto's personal epochs")
    alpha: float = Field(0.5, ge=0, le=1, description="APFL's initial mixing weight")
    alpha_lr: float = Field(0.001, ge=0)
    eval_clients: int = Field(0, ge=0, description="clients evaluated per round (0: all)")
    test_fraction: float = Field(0.2, gt=0, lt=0.9)

    @model_validator(mode="after")
    def _check(self) -> Self:
        try:
            self.options()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def options(self) -> PersonalizationConfig:
        data = self.model_dump()
        data["personal_layers"] = tuple(data["personal_layers"])
        data["personal_types"] = tuple(data["personal_types"])
        data["finetune_head"] = tuple(data["finetune_head"])
        return PersonalizationConfig(**data)


@dataclass
class PersonalClientFactory:
    """``client_fn`` of a personalized run: picklable, for the process backend too."""

    spec: Any  # fedhive.cli.experiment.ModelSpec
    x: np.ndarray
    y: np.ndarray
    splits: list[ClientSplit]
    config: PersonalizationConfig
    initial: NDArrays
    split: SharedSplit

    def __call__(self, context: Context) -> PersonalizedTorchClient:
        from fedhive.personalization.client import PersonalizedTorchClient

        part = self.splits[int(context.node_config["partition-id"])]
        return PersonalizedTorchClient(
            self.spec.torch_model,
            self.config,
            train=(self.x[part.train], self.y[part.train]),
            test=(self.x[part.test], self.y[part.test]),
            val=(self.x[part.val], self.y[part.val]),
            initial=self.initial,
            split=self.split,
        )


def personal_clients(
    section: PersonalizationSection,
    spec: Any,
    x: np.ndarray,
    y: np.ndarray,
    partition: Partition,
    *,
    val_fraction: float,
    seed: int,
) -> PersonalClientFactory:
    """The clients of a personalized run, each with its own train, validation and test
    split, and the model's shared/personal split (checked against the model now)."""
    from fedhive.data.partition import client_splits
    from fedhive.personalization.client import split_for

    if spec.name == "logreg":
        raise ConfigError(
            "[personalization] needs a torch model: set model.name to 'cnn1d' or 'mlp'"
        )
    config = section.options()
    initial = spec.initial(seed)
    model = spec.torch_model()
    split = split_for(model, config)
    splits = client_splits(
        partition, val_fraction=val_fraction, test_fraction=config.test_fraction, seed=seed
    )
    return PersonalClientFactory(spec, x, y, splits, config, initial, split)


def evaluation_sampling(section: PersonalizationSection, num_clients: int) -> dict[str, Any]:
    """The strategy's evaluation sampling: every client, or ``eval_clients`` of them."""
    n = section.eval_clients or num_clients
    if n > num_clients:
        raise ConfigError(
            f"personalization.eval_clients = {n} but there are only {num_clients} clients"
        )
    return {"fraction_evaluate": n / num_clients, "min_evaluate_clients": n}


def write_report(path: Path, history: History) -> dict[str, Any]:
    """Write the figures to quote (:func:`fedhive.personalization.report`) as JSON."""
    figures = report(history)
    atomic_write_bytes(path, json.dumps(figures, indent=2).encode())
    return figures


def format_report(figures: dict[str, Any]) -> str:
    """The report as a few lines of text (per-client test accuracy)."""
    if not figures:
        return "personalization: no round was evaluated"
    lines = ["personalization (per-client test accuracy; round chosen on validation):"]
    for label, key in (("last round", "last"), ("selected round", "selected")):
        part = figures[key]
        for model in ("personalized", "global"):
            f = part[model]
            lines.append(
                f"  {label} {part['round']:>4} {model:>12}: mean {f['mean']:.4f}  "
                f"weighted {f['weighted_mean']:.4f}  median {f['median']:.4f}  "
                f"worst10% {f['worst10']:.4f}  std {f['std']:.4f}"
            )
    return "\n".join(lines)
