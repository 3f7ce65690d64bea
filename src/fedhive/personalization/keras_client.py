"""Personalization for Keras 3 models: :class:`PersonalizedKerasClient`.

The same client as :class:`~fedhive.personalization.client.PersonalizedTorchClient`
(what is uploaded, what is kept, state, evaluation), trained through Keras. Personal
layers are chosen by weight path or layer type (``names=["*/head/*"]``,
``types=["BatchNormalization"]``; see :func:`fedhive.personalization.select_personal`).

Methods: ``none``, ``finetune``, ``fedper``, ``fedrep`` (Collins et al. 2021: the head,
then the body, each with the other's variables frozen, batch norm still in training
mode), ``fedbn`` and ``ditto`` (Li, Hu, Beirami, Smith 2021: an SGD step on the
personal model, then the proximal step towards the global one, after every batch).
``apfl`` needs the gradient of the mixed model with respect to alpha, which only the
torch client computes; it is refused here.

Training is plain SGD with the fit config's ``lr``, ``momentum``, ``batch_size`` and
``local_epochs``, minibatches in an order drawn from the task's seed; ``loss`` defaults
to sparse categorical cross-entropy on logits (give
``keras.losses.SparseCategoricalCrossentropy()`` for a model that ends in a softmax).
Any backend works; the tests use ``KERAS_BACKEND=torch``.

Example::

    import keras
    from fedhive.personalization import PersonalizationConfig
    from fedhive.personalization.keras_client import PersonalizedKerasClient

    model = keras.Sequential([keras.Input((40,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10, name="head")])
    config = PersonalizationConfig(method="fedper", personal_layers=("*/head/*",))
    client = PersonalizedKerasClient(model, config, train=(x, y), test=(xt, yt))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Set
from pathlib import Path
from typing import Any

import numpy as np

from fedhive.common.errors import ConfigError, MissingDependency
from fedhive.common.records import NDArrays
from fedhive.personalization.client import Data, PersonalizedClient
from fedhive.personalization.config import PersonalizationConfig
from fedhive.personalization.layers import SharedSplit, keras_weight_names
from fedhive.personalization.training import Info, TrainSettings

try:
    import keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency("keras", "keras") from exc

__all__ = ["KerasTrainer", "PersonalizedKerasClient"]


def _batches(n: int, epochs: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    size = batch_size if batch_size > 0 else max(n, 1)
    for _ in range(epochs if n else 0):
        order = rng.permutation(n)
        for start in range(0, n, size):
            yield order[start : start + size]


class KerasTrainer:
    """The :class:`~fedhive.personalization.training.Trainer` of Keras models."""

    methods = frozenset({"none", "finetune", "fedper", "fedrep", "fedbn", "ditto"})

    def __init__(self, loss: Any = None) -> None:
        self.loss = loss

    def _loss(self) -> Any:
        if self.loss is not None:
            return self.loss
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def _compile(self, model: Any, settings: TrainSettings, momentum: float | None = None) -> None:
        optimizer = keras.optimizers.SGD(
            learning_rate=settings.lr,
            momentum=settings.momentum if momentum is None else momentum,
        )
        model.compile(optimizer=optimizer, loss=self._loss())

    def weights(self, model: Any) -> NDArrays:
        return [np.array(w, copy=True) for w in model.get_weights()]

    def _epochs(
        self,
        model: Any,
        x: Any,
        y: Any,
        epochs: int,
        settings: TrainSettings,
        seed: int,
        after_batch: Callable[[], None] | None = None,
    ) -> Info:
        xs, ys = np.asarray(x, dtype=np.float32), np.asarray(y)
        steps, seen, total = 0, 0, 0.0
        for index in _batches(len(ys), epochs, settings.batch_size, seed):
            loss = model.train_on_batch(xs[index], ys[index])
            value = float(loss[0] if isinstance(loss, list | tuple) else loss)
            if after_batch is not None:
                after_batch()
            steps, seen, total = steps + 1, seen + len(index), total + value * len(index)
        return {"loss": total / seen if seen else math.nan, "num_steps": steps}

    def train(
        self,
        model: Any,
        arrays: NDArrays,
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        *,
        epochs: int | None = None,
    ) -> tuple[NDArrays, Info]:
        model.set_weights(arrays)
        self._compile(model, settings)
        info = self._epochs(
            model, x, y, settings.epochs if epochs is None else epochs, settings, seed
        )
        return self.weights(model), info

    def train_fedrep(
        self,
        model: Any,
        arrays: NDArrays,
        head: Set[str],
        x: Any,
        y: Any,
        settings: TrainSettings,
        seed: int,
        head_epochs: int,
    ) -> tuple[NDArrays, Info]:
        """The head's variables trained with the body's frozen, then the reverse; a
        variable is frozen by its own ``trainable`` flag, so batch norm keeps training
        mode (a frozen Keras *layer* would switch it to inference)."""
        model.set_weights(arrays)
        names = [name for name, _ in keras_weight_names(model)]
        variables = list(model.weights)
        flags = {id(v): v.trainable for v in variables}
        trainable = [(name in head, v) for name, v in zip(names, variables, strict=True)]
        trainable = [(is_head, v) for is_head, v in trainable if flags[id(v)]]
        try:
            for is_head, v in trainable:
                v.trainable = is_head
            self._compile(model, settings)
            first = self._epochs(model, x, y, head_epochs, settings, seed)
            for is_head, v in trainable:
                v.trainable = not is_head
            self._compile(model, settings)
            info = self._epochs(model, x, y, settings.epochs, settings, seed + 1)
        finally:
            for v in variables:
                v.trainable = flags[id(v)]
        info["num_steps"] = int(first["num_steps"]) + int(info["num_steps"])
        return self.weights(model), info

    def train_ditto(
        self,
        model: Any,
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
        """Proximal SGD on ``F(v) + lam/2 ||v - w||^2``: each batch a plain SGD step on
        ``F``, then ``v <- (v + lr lam w) / (1 + lr lam)`` on the trainable variables."""
        if math.isinf(lam):
            return [np.array(a, copy=True) for a in global_arrays]
        model.set_weights(personal)
        self._compile(model, settings, momentum=0.0)
        shrink = 1.0 / (1.0 + settings.lr * lam)
        anchored = [
            (v, np.asarray(w) * (1.0 - shrink))
            for v, w in zip(model.weights, global_arrays, strict=True)
            if v.trainable
        ]

        def proximal() -> None:
            for v, pull in anchored:
                v.assign(keras.ops.convert_to_numpy(v) * shrink + pull)

        self._epochs(model, x, y, epochs, settings, seed, after_batch=proximal)
        return self.weights(model)

    def train_apfl(self, *args: Any, **kwargs: Any) -> tuple[NDArrays, NDArrays, float, Info]:
        raise ConfigError("apfl runs on torch models only (PersonalizedTorchClient)")

    def evaluate(self, model: Any, arrays: NDArrays, x: Any, y: Any) -> tuple[float, float]:
        model.set_weights(arrays)
        xs, ys = np.asarray(x, dtype=np.float32), np.asarray(y)
        out = keras.ops.convert_to_numpy(model(xs, training=False))
        loss = float(np.mean(keras.ops.convert_to_numpy(self._loss()(ys, out))))
        return loss, float(np.mean(np.argmax(out, axis=-1) == ys))


class PersonalizedKerasClient(PersonalizedClient):
    """:class:`~fedhive.personalization.client.PersonalizedClient` for Keras models (see
    the module docstring); the torch client's arguments, and ``loss``."""

    def __init__(
        self,
        model: Any,
        config: PersonalizationConfig,
        train: Data,
        test: Data,
        val: Data | None = None,
        *,
        loss: Any = None,
        initial: NDArrays | None = None,
        split: SharedSplit | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        super().__init__(
            model,
            config,
            train,
            test,
            val,
            trainer=KerasTrainer(loss),
            initial=initial,
            split=split,
            state_dir=state_dir,
        )
