"""Personalized federated learning: each client keeps a model of its own.

Methods, chosen by name (:class:`PersonalizationConfig`, or ``[personalization] method``
in ``fedhive run``):

- ``"none"``: FedAvg, evaluated the same way (the baseline).
- ``"finetune"``: the global model fine-tuned locally before evaluation (Cheng, Chadha,
  Duchi 2021, "Fine-tuning is Fine in Federated Learning").
- ``"fedper"``: a shared body and a personal head that never leaves the client
  (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers").
- ``"fedrep"``: FedPer's split, the head trained first with the body frozen, then the
  body (Collins et al. 2021, "Exploiting Shared Representations for Personalized
  Federated Learning").
- ``"fedbn"``: batch-norm parameters and statistics stay local (Li et al. 2021, "FedBN:
  Federated Learning on Non-IID Features via Local Batch Normalization").
- ``"ditto"``: a personal model regularised towards the global one with ``lam`` (Li, Hu,
  Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
  Personalization").
- ``"apfl"``: the personal and the global model mixed with a learned ``alpha`` (Deng,
  Kamani, Mahdavi 2020, "Adaptive Personalized Federated Learning").

The server only ever holds the shared part of the model, as a standard model record:
every strategy aggregates it, DP clips and noises it, secure aggregation masks it and
codecs compress it, with no change to any of them. Personal layers are chosen by name
pattern or module type (:func:`select_personal`); a selection of none or all of the
parameters is refused. Evaluation measures every client's personal model and the global
one on the client's own test split and adds ``personalized`` and ``global`` summaries to
each round record (:class:`PersonalizationReport`, :func:`report`).
:class:`PersonalizedTorchClient` runs every method on torch modules,
:class:`PersonalizedKerasClient` all but APFL on Keras 3 models.

Example::

    from fedhive.personalization import PersonalizationConfig, PersonalizedTorchClient

    config = PersonalizationConfig(method="ditto", lam=0.1)
"""

from __future__ import annotations

from typing import Any

from fedhive.personalization.config import METHODS, PARTIAL_METHODS, PersonalizationConfig
from fedhive.personalization.evaluation import (
    SUMMARY_KEYS,
    PersonalizationReport,
    report,
    summarize,
    summarize_round,
)
from fedhive.personalization.layers import SharedSplit, select_personal

__all__ = [
    "METHODS",
    "PARTIAL_METHODS",
    "SUMMARY_KEYS",
    "PersonalizationConfig",
    "PersonalizationReport",
    "PersonalizedClient",
    "PersonalizedKerasClient",
    "PersonalizedTorchClient",
    "SharedSplit",
    "report",
    "select_personal",
    "split_for",
    "summarize",
    "summarize_round",
]


def __getattr__(name: str) -> Any:
    # The clients import torch or Keras: only when they are asked for.
    if name in ("PersonalizedClient", "PersonalizedTorchClient", "split_for"):
        from fedhive.personalization import client

        return getattr(client, name)
    if name == "PersonalizedKerasClient":
        from fedhive.personalization import keras_client

        return keras_client.PersonalizedKerasClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
