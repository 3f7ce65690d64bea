"""A NumPyClient that runs a personalization method on a torch (or Keras) model.

What leaves the client is only the shared part of the model (all of it for fine-tuning,
Ditto and APFL, whose personal model is a second copy kept at home; the body for FedPer
and FedRep; everything but batch norm for FedBN). The personal part lives in the
client's persistent state (``context.state``, record :data:`STATE_RECORD`): in
simulation the state store keeps it across the rebuilds of virtual clients, spills it to
disk beyond its memory budget and saves it in every checkpoint; a deployed client with a
``state_dir`` also writes it there after each fit (never on evaluate), so it survives a
restart.

Example::

    from fedhive.models.torch_models import CNN1D
    from fedhive.personalization import PersonalizationConfig, PersonalizedTorchClient

    config = PersonalizationConfig(method="fedper", personal_layers=("head",))
    client = PersonalizedTorchClient(
        CNN1D(seed=0), config, train=(x_tr, y_tr), test=(x_te, y_te), val=(x_va, y_va)
    )
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedhive.client.numpy_client import NumPyClient
from fedhive.common.atomic import SECRET_MODE, atomic_write_bytes
from fedhive.common.errors import ConfigError, SerdeError, StateError
from fedhive.common.records import Config, NDArrays, RecordDict, Scalar
from fedhive.personalization.config import PersonalizationConfig
from fedhive.personalization.evaluation import client_metrics
from fedhive.personalization.layers import SharedSplit, select_personal
from fedhive.personalization.training import Trainer, TrainSettings, mix

__all__ = [
    "META_RECORD",
    "STATE_RECORD",
    "PersonalizedClient",
    "PersonalizedTorchClient",
    "split_for",
]

#: ``context.state.array_records[STATE_RECORD]``: the personal arrays ``"0"``, ``"1"``, ...
STATE_RECORD = "personalization"
#: ``context.state.config_records[META_RECORD]``: method, APFL's alpha, fits so far.
META_RECORD = "personalization.meta"

Data = tuple[Any, Any]


def split_for(model: Any, config: PersonalizationConfig) -> SharedSplit:
    """The split of ``model``'s arrays that ``config`` asks for (nothing personal unless
    the method personalises some layers)."""
    if config.partial:
        return select_personal(
            model,
            names=config.personal_layers,
            types=config.layer_types,
            every_type=bool(config.personal_types or config.personal_layers),
        )
    from fedhive.personalization.layers import _weight_names

    return SharedSplit.whole([name for name, _ in _weight_names(model)])


class PersonalizedClient(NumPyClient):
    """Runs ``config.method`` on a model through ``trainer`` (see the module docstring);
    :class:`PersonalizedTorchClient` and
    :class:`~fedhive.personalization.keras_client.PersonalizedKerasClient` choose it.

    ``model`` is a model or a zero-argument callable returning one (its weights are
    always overwritten before use). ``train``, ``test`` and ``val`` are ``(x, y)``
    arrays: the client trains on ``train``, and evaluation reports both the personal
    and the global model on ``val`` and ``test``. ``initial`` is the full initial
    model (personal layers of a client that never trained start from it; the default is
    the model's current weights); ``split`` overrides the selection ``config`` makes.
    ``state_dir``: where a deployed client keeps its personal state across restarts
    (``fedhive client --state-dir`` keeps the whole ``context.state`` instead).

    Fit config keys: ``local_epochs``, ``batch_size``, ``lr``, ``momentum``.
    """

    def __init__(
        self,
        model: Any,
        config: PersonalizationConfig,
        train: Data,
        test: Data,
        val: Data | None = None,
        *,
        trainer: Trainer,
        initial: NDArrays | None = None,
        split: SharedSplit | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        if not isinstance(config, PersonalizationConfig):
            raise ConfigError(
                f"config must be a PersonalizationConfig, got {type(config).__name__}"
            )
        if config.method not in trainer.methods:
            raise ConfigError(
                f"personalization.method = {config.method!r} is not available for "
                f"{type(self).__name__}; it runs {sorted(trainer.methods)}"
            )
        self.trainer = trainer
        self._model_fn: Callable[[], Any] = (
            model if callable(model) and not _is_model(model) else (lambda: model)
        )
        self.config = config
        self.train, self.test = train, test
        self.val = val if val is not None else (np.asarray(test[0])[:0], np.asarray(test[1])[:0])
        if len(self.test[1]) == 0:
            raise ConfigError("this client has an empty test split; evaluation needs one")
        module = self._model_fn()
        self.initial = [np.array(a, copy=True) for a in (initial or trainer.weights(module))]
        self.split = split or split_for(module, config)
        if self.split.num_arrays != len(self.initial):
            raise ConfigError(
                f"the split covers {self.split.num_arrays} arrays, the model has "
                f"{len(self.initial)}"
            )
        self.state_dir = None if state_dir is None else Path(state_dir)
        self._own_state = RecordDict()
        #: The layers fine-tuning trains first, alone (``finetune_head``; LP-FT).
        self.finetune_head: frozenset[str] = frozenset(
            select_personal(module, names=config.finetune_head).personal_names
            if config.finetune_head
            else ()
        )

    # -- state ----------------------------------------------------------------------------

    def _state(self) -> RecordDict:
        return self._context.state if self._context is not None else self._own_state

    def _node(self) -> str:
        return self._context.node_id if self._context is not None else "local"

    def _state_file(self) -> Path | None:
        if self.state_dir is None:
            return None
        digest = hashlib.blake2b(self._node().encode(), digest_size=12).hexdigest()
        return self.state_dir / f"personal-{digest}.fhv"

    def _load(self) -> tuple[NDArrays | None, dict[str, Scalar]]:
        """The personal arrays and metadata kept so far (``None`` if this client has not
        trained yet), from the context's state or else from ``state_dir``."""
        state = self._state()
        if STATE_RECORD not in state.array_records:
            path = self._state_file()
            if path is not None and path.exists():
                from fedhive.common.serde import decode_record_dict

                try:
                    stored = decode_record_dict(bytearray(path.read_bytes()))
                except (OSError, SerdeError) as exc:
                    raise StateError(f"cannot read the personal state in {path}: {exc}") from exc
                state.array_records.update(stored.array_records)
                state.config_records.update(stored.config_records)
        record = state.array_records.get(STATE_RECORD)
        meta = dict(state.config_records.get(META_RECORD, {}))
        if record is None:
            return None, meta
        if meta.get("method") != self.config.method:
            raise StateError(
                f"this client's personal state was made by method {meta.get('method')!r}, "
                f"not {self.config.method!r}; clear the state (or its state_dir) to switch"
            )
        return [record[str(i)] for i in range(len(record))], meta

    def _save(self, personal: NDArrays, meta: dict[str, Scalar]) -> None:
        state = self._state()
        state.array_records[STATE_RECORD] = {str(i): a for i, a in enumerate(personal)}
        state.config_records[META_RECORD] = {**meta, "method": self.config.method}
        path = self._state_file()
        if path is not None:
            from fedhive.common.serde import encode_record_dict

            path.parent.mkdir(parents=True, exist_ok=True)
            mine = RecordDict(
                {STATE_RECORD: state.array_records[STATE_RECORD]},
                {META_RECORD: state.config_records[META_RECORD]},
            )
            # what was learnt from this site's data: owner only
            atomic_write_bytes(path, encode_record_dict(mine), mode=SECRET_MODE)

    # -- the model ------------------------------------------------------------------------

    def _seed(self) -> int:
        return self._context.seed if self._context is not None else 0

    def _full_global(self, shared: NDArrays) -> NDArrays:
        """The global model: the server's shared arrays, personal ones at their initial
        values (the server has no others)."""
        self._check_shared(shared)
        return self.split.merge(shared, self.split.personal_part(self.initial))

    def _check_shared(self, shared: NDArrays) -> None:
        expected = [self.initial[i].shape for i in self.split.shared_indices]
        got = [np.shape(a) for a in shared]
        if got != expected:
            raise ConfigError(
                f"the server sent {len(got)} arrays of shapes {got[:4]}..., but this client "
                f"shares {len(expected)} arrays of shapes {expected[:4]}... (method "
                f"{self.config.method!r}): server and client must select the same personal "
                "layers"
            )

    def get_parameters(self, config: Config) -> NDArrays:
        return self.split.shared(self.initial)

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        method, settings, seed = self.config.method, TrainSettings.from_config(config), self._seed()
        full = self._full_global(parameters)
        model, trainer = self._model_fn(), self.trainer
        kept, meta = self._load()
        x, y = self.train
        upload: NDArrays
        if method in ("none", "finetune"):
            upload, info = trainer.train(model, full, x, y, settings, seed)
        elif method in ("fedper", "fedbn", "fedrep"):
            personal = kept if kept is not None else self.split.personal_part(self.initial)
            start = self.split.merge(parameters, personal)
            if method == "fedrep":
                head = set(self.split.personal_names)
                new, info = trainer.train_fedrep(
                    model, start, head, x, y, settings, seed, self.config.head_epochs
                )
            else:
                new, info = trainer.train(model, start, x, y, settings, seed)
            self._save(self.split.personal_part(new), meta)
            upload = self.split.shared(new)
        elif method == "ditto":
            upload, info = trainer.train(model, full, x, y, settings, seed)
            v = kept if kept is not None else full
            epochs = self.config.personal_epochs
            v = trainer.train_ditto(
                model,
                v,
                full,
                x,
                y,
                settings,
                seed + 1,
                lam=self.config.lam,
                epochs=settings.epochs if epochs is None else epochs,
            )
            self._save(v, meta)
        else:  # apfl
            v = kept if kept is not None else full
            alpha = float(meta.get("alpha", self.config.alpha))
            upload, v, alpha, info = trainer.train_apfl(
                model, full, v, alpha, x, y, settings, seed, alpha_lr=self.config.alpha_lr
            )
            self._save(v, {**meta, "alpha": alpha})
        metrics: dict[str, Scalar] = {
            "loss": float(info["loss"]),
            "num_steps": int(info["num_steps"]),
        }
        return upload, len(y), metrics

    def personal_model(self, parameters: NDArrays, config: Config | None = None) -> NDArrays:
        """This client's personal model, given the server's shared ``parameters``."""
        method = self.config.method
        full = self._full_global(parameters)
        kept, meta = self._load()
        if method == "none":
            return full
        if method == "finetune":
            return self._finetune(full, TrainSettings.from_config(config or {}))
        if kept is None:
            return full
        if self.config.partial:
            return self.split.merge(parameters, kept)
        if method == "ditto":
            return kept
        return mix(float(meta.get("alpha", self.config.alpha)), kept, full)

    def _finetune(self, full: NDArrays, settings: TrainSettings) -> NDArrays:
        """Fine-tuning of the global model: the head alone first when asked (LP-FT,
        ``finetune_head_epochs`` with the body frozen), then every layer for
        ``finetune_epochs``."""
        tuned, seed = full, self._seed() + 7
        if self.finetune_head:
            tuned, _ = self.trainer.train_fedrep(
                self._model_fn(),
                tuned,
                self.finetune_head,
                *self.train,
                replace(settings, epochs=0),
                seed + 1,
                self.config.finetune_head_epochs,
            )
        if self.config.finetune_epochs > 0:
            tuned, _ = self.trainer.train(
                self._model_fn(), tuned, *self.train, settings, seed,
                epochs=self.config.finetune_epochs,
            )  # fmt: skip
        return tuned

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        global_model = self._full_global(parameters)
        personal = self.personal_model(parameters, config)
        model = self._model_fn()
        p, g = self._measure(model, personal), self._measure(model, global_model)
        metrics = client_metrics(p, g, len(self.test[1]), len(self.val[1]))
        return float(p["test_loss"]), len(self.test[1]), metrics

    def _measure(self, model: Any, arrays: NDArrays) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, (x, y) in (("test", self.test), ("val", self.val)):
            if len(y) == 0:
                out[f"{name}_loss"] = out[f"{name}_accuracy"] = float("nan")
                continue
            loss, acc = self.trainer.evaluate(model, arrays, x, y)
            out[f"{name}_loss"], out[f"{name}_accuracy"] = loss, acc
        return out


def _is_model(obj: Any) -> bool:
    """A torch module or a Keras model (both callable), not a factory of one."""
    return hasattr(obj, "state_dict") or (hasattr(obj, "get_weights") and hasattr(obj, "layers"))


class PersonalizedTorchClient(PersonalizedClient):
    """:class:`PersonalizedClient` for torch modules (every method); the same arguments
    but ``trainer``.

    Example::

        client = PersonalizedTorchClient(
            CNN1D(seed=0), PersonalizationConfig(method="ditto", lam=0.1),
            train=(x_tr, y_tr), test=(x_te, y_te), val=(x_va, y_va),
        )
    """

    def __init__(
        self,
        model: Any,
        config: PersonalizationConfig,
        train: Data,
        test: Data,
        val: Data | None = None,
        *,
        initial: NDArrays | None = None,
        split: SharedSplit | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        from fedhive.personalization.torch_methods import TorchTrainer

        super().__init__(
            model,
            config,
            train,
            test,
            val,
            trainer=TorchTrainer(),
            initial=initial,
            split=split,
            state_dir=state_dir,
        )
