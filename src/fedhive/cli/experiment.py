"""Build and run the experiment a config describes: data, partition, model, clients, strategy."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhive.cli.config import ExperimentConfig, ModelConfig
from fedhive.cli.personalization import (
    PersonalClientFactory,
    evaluation_sampling,
    personal_clients,
)
from fedhive.cli.strategies import RegistryView, StrategyConfig
from fedhive.client.app import Mod
from fedhive.client.context import Context
from fedhive.client.mods import scaffold_correction
from fedhive.client.numpy_client import NumPyClient
from fedhive.common.errors import ConfigError
from fedhive.common.records import Config, NDArrays, Scalar, ndarrays_to_parameters
from fedhive.data import Dataset, Partition, load_dataset
from fedhive.data import partition as partitioners
from fedhive.data.partition import ClientSplit
from fedhive.personalization import PersonalizationReport, SharedSplit
from fedhive.server.config import ServerConfig
from fedhive.server.engine import RoundCallback
from fedhive.server.history import History
from fedhive.server.strategy import Strategy
from fedhive.server.strategy.fednova import local_norm
from fedhive.server.strategy.traits import traits_of

__all__ = ["STRATEGIES", "Experiment", "build_experiment", "build_strategy", "run_experiment"]


def _strategy_class(model: type[StrategyConfig]) -> type[Strategy]:
    if model.strategy_class is None:  # pragma: no cover - register_strategy refuses it
        raise ConfigError(f"{model.__name__} names no strategy class")
    return model.strategy_class


def load_data(cfg: ExperimentConfig) -> Dataset:
    data = cfg.data
    if data.dataset == "mnist1d":
        return load_dataset("mnist1d", num_samples=data.num_samples, seed=cfg.seed)
    if data.dataset == "digits":
        return load_dataset("digits", seed=cfg.seed)
    if data.dataset == "synthetic":
        return load_dataset("synthetic", alpha=1.0, beta=1.0, seed=cfg.seed)
    if not data.path:
        raise ConfigError("data.dataset = 'folder' needs data.path (a folder of .npz/.csv)")
    return load_dataset("folder", path=data.path)


def make_partition(cfg: ExperimentConfig, dataset: Dataset) -> Partition:
    data, k, seed = cfg.data, cfg.num_clients, cfg.seed
    y = dataset.y_train
    if data.partition == "iid":
        return partitioners.iid(len(y), k, seed)
    if data.partition == "dirichlet":
        return partitioners.dirichlet(y, k, data.alpha, seed, min_size=data.min_size)
    if data.partition == "shards":
        return partitioners.shards(y, k, shards_per_client=data.shards_per_client, seed=seed)
    if data.partition == "quantity_skew":
        return partitioners.quantity_skew(len(y), k, seed, sigma=data.sigma)
    if dataset.client_ids_train is None:
        raise ConfigError(
            f"data.partition = 'natural' needs a data set with client ids, "
            f"and {dataset.name!r} has none (use dataset = 'synthetic')"
        )
    part = partitioners.natural(dataset.client_ids_train)
    if len(part.indices) != k:
        raise ConfigError(
            f"num_clients = {k}, but the natural partition of {dataset.name!r} has "
            f"{len(part.indices)} clients"
        )
    return part


@dataclass
class ModelSpec:
    """What model to build; the torch model is cached per worker thread."""

    name: str
    in_dim: int
    num_classes: int
    hidden: int
    batch_norm: bool = False
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @classmethod
    def for_data(cls, model: ModelConfig, dataset: Dataset) -> ModelSpec:
        """The ``[model]`` table's model for ``dataset``'s inputs and classes."""
        in_dim = int(np.prod(dataset.x_train.shape[1:]))
        return cls(model.name, in_dim, dataset.num_classes, model.hidden, model.batch_norm)

    def initial(self, seed: int) -> NDArrays:
        if self.name == "logreg":
            from fedhive.models import numpy_lr

            return numpy_lr.init_params(self.in_dim, self.num_classes, seed)
        from fedhive.models.torch_models import get_weights

        return get_weights(self._build(seed))

    def _build(self, seed: int | None) -> Any:
        from fedhive.models.torch_models import CNN1D, MLP

        if self.name == "cnn1d":
            return CNN1D(
                self.num_classes, length=self.in_dim, seed=seed, batch_norm=self.batch_norm
            )
        return MLP(self.in_dim, self.hidden, self.num_classes, seed=seed)

    def torch_model(self) -> Any:
        """This thread's model instance (weights are always overwritten before use)."""
        model = getattr(self._local, "model", None)
        if model is None:
            import torch

            with torch.device("meta"):
                model = self._build(None)  # no RNG is touched on the meta device
            model = model.to_empty(device="cpu")
            self._local.model = model
        return model

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


def train_eval(
    spec: ModelSpec,
    parameters: NDArrays,
    x: np.ndarray,
    y: np.ndarray,
    config: Config,
    seed: int,
    correction: NDArrays | None = None,
) -> tuple[NDArrays, dict[str, float | int]]:
    """One client's local training with the reference loops.

    Reads ``"proximal_mu"`` (FedProx) from ``config`` when present; ``correction`` is
    SCAFFOLD's ``c - c_i``, added to every gradient.
    """
    epochs, batch = int(config["local_epochs"]), int(config["batch_size"])
    lr, momentum = float(config["lr"]), float(config["momentum"])
    mu = float(config.get("proximal_mu", 0.0))
    max_steps = int(config.get("max_steps", 0)) or None  # 0: every epoch's minibatches
    if spec.name == "logreg":
        from fedhive.models import numpy_lr

        return numpy_lr.train(
            parameters,
            x,
            y,
            epochs=epochs,
            batch_size=batch,
            lr=lr,
            seed=seed,
            momentum=momentum,
            proximal_mu=mu,
            max_steps=max_steps,
            correction=correction,
        )
    from fedhive.models.torch_models import get_weights, set_weights, train_torch

    model = spec.torch_model()
    set_weights(model, parameters)
    info = train_torch(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch,
        lr=lr,
        momentum=momentum,
        seed=seed,
        proximal_mu=mu,
        max_steps=max_steps,
        correction=correction,
    )
    return get_weights(model), info


def evaluate_params(
    spec: ModelSpec, parameters: NDArrays, x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    if spec.name == "logreg":
        from fedhive.models import numpy_lr

        return numpy_lr.evaluate(parameters, x, y)
    from fedhive.models.torch_models import evaluate_torch, set_weights

    model = spec.torch_model()
    set_weights(model, parameters)
    return evaluate_torch(model, x, y)


class SimClient(NumPyClient):
    """A simulated participant: local SGD on its own shard, evaluation on its held-out part.

    Follows FedProx's ``"proximal_mu"`` fit config, reports ``"num_steps"`` (FedNova,
    SCAFFOLD) and ``"loss"``, and applies SCAFFOLD's correction when run with
    ``fedhive.client.mods.scaffold_mod``. In a SCAFFOLD round with heavy-ball momentum
    ``m > 0`` it also reports the effective learning rate ``lr * ||a||_1 / K`` as metric
    ``"lr"`` (``||a||_1`` is FedNova's ``local_norm(K, m)``: how far ``K`` steps of
    momentum SGD move along a constant gradient, Wang et al. 2020), so that the mod's
    Option II variate ``(x - y_i) / (K lr)`` estimates the mean gradient rather than
    ``1 / (1 - m)`` times it (Karimireddy et al. 2020 analyse plain SGD).
    """

    def __init__(self, spec: ModelSpec, train: tuple[Any, Any], val: tuple[Any, Any]) -> None:
        self.spec = spec
        self.train, self.val = train, val

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        seed = self.context.seed if self._context is not None else 0
        correction = scaffold_correction(self.context) if self._context is not None else None
        if config.get("scaffold") and correction is None:
            raise ConfigError(
                "this fit is a SCAFFOLD round but no control variate correction was found: "
                "run the clients with mods=[fedhive.client.mods.scaffold_mod]"
            )
        new, info = train_eval(self.spec, parameters, *self.train, config, seed, correction)
        steps = int(info["num_steps"])
        metrics: dict[str, Scalar] = {"loss": float(info["loss"]), "num_steps": steps}
        momentum = float(config["momentum"])
        if correction is not None and momentum > 0 and steps > 0:
            metrics["lr"] = float(config["lr"]) * local_norm(steps, momentum) / steps
        return new, len(self.train[1]), metrics

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        if len(self.val[1]) == 0:
            raise ConfigError("this client holds no evaluation data (data.val_fraction = 0)")
        loss, acc = evaluate_params(self.spec, parameters, *self.val)
        return loss, len(self.val[1]), {"accuracy": acc}


@dataclass
class ClientFactory:
    """``client_fn``: picklable, so the process backend can use it too."""

    spec: ModelSpec
    x: np.ndarray
    y: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]

    def __call__(self, context: Context) -> SimClient:
        train_idx, val_idx = self.splits[int(context.node_config["partition-id"])]
        train = (self.x[train_idx], self.y[train_idx])
        val = (self.x[val_idx], self.y[val_idx])
        return SimClient(self.spec, train, val)


def split_clients(
    partition: Partition, val_fraction: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client's indices cut into (train, held-out evaluation) parts, seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for idx in partition.indices:
        shuffled = rng.permutation(idx)
        n_val = round(len(idx) * val_fraction)
        out.append((np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])))
    return out


def weighted_average(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of every numeric metric the clients report."""
    total = sum(n for n, _ in metrics)
    if total == 0:
        return {}
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, int | float)}
    return {k: sum(n * float(m[k]) for n, m in metrics if k in m) / total for k in sorted(keys)}


@dataclass
class Experiment:
    cfg: ExperimentConfig
    #: The built-in data and its partition; None for the user's own client (``app``).
    dataset: Dataset | None
    partition: Partition | None
    client_fn: ClientFactory | PersonalClientFactory | Callable[..., Any]
    strategy: Strategy
    #: Client mods the strategy needs (``scaffold_mod`` for SCAFFOLD).
    mods: tuple[Mod, ...] = ()
    #: Round callbacks the experiment needs (personalization's per-client summaries).
    callbacks: tuple[RoundCallback, ...] = ()

    def describe(self) -> str:
        """``"digits (1437 train / 360 test), partition iid, model logreg"``, or the app."""
        cfg, data = self.cfg, self.dataset
        if data is None:
            return f"your client {cfg.app}"
        return (
            f"{data.name} ({len(data.y_train)} train / {len(data.y_test)} test), "
            f"partition {cfg.data.partition}, model {cfg.model.name}"
        )


#: ``[strategy] name`` -> the class it builds: a live view of the registry in
#: :mod:`fedhive.cli.strategies`, kept for compatibility.
STRATEGIES: Mapping[str, type[Strategy]] = RegistryView(_strategy_class)


def build_strategy(
    st: StrategyConfig, train: Config, fedavg_args: dict[str, Any]
) -> tuple[Strategy, tuple[Mod, ...]]:
    """The strategy ``[strategy]`` names, with its parameters, and the client mods it needs.

    ``fedavg_args`` are FedAvg's keyword arguments (sampling, evaluation, configs); the
    strategy's own parameters come from ``st`` (unset ones keep the class defaults, or
    follow the clients' ``train`` settings where its model says so: q-FedAvg's
    ``qffl_learning_rate`` and FedNova's ``local_momentum``). The mods are the built
    strategy's ``traits.required_mods`` (SCAFFOLD's ``scaffold_mod``, Karimireddy et al.
    2020).
    """
    strategy = st.build(fedavg_args, train)
    return strategy, tuple(traits_of(strategy).required_mods)


def model_strategy(
    st: StrategyConfig,
    spec: ModelSpec | None,
    dataset: Dataset | None,
    fit_config: Config,
    seed: int,
    *,
    min_available_clients: int,
    initial: NDArrays | None = None,
    shared: SharedSplit | None = None,
) -> tuple[Strategy, tuple[Mod, ...]]:
    """:func:`build_strategy` with the FedAvg arguments of ``fedhive run`` and ``fedhive
    server``: ``[strategy]``'s sampling, ``fit_config`` sent every round, the initial model
    (``initial`` if given, else ``spec``'s for ``seed``, else none: the engine asks a
    client), weighted metric averages and (if ``centralized_eval`` and there is a
    ``spec``) the model's loss and accuracy on ``dataset``'s test split. With ``shared`` (a
    personalized run) the server's model is the shared part only; centralized evaluation
    completes it with the personal layers' initial values."""

    if initial is None and spec is not None:
        initial = spec.initial(seed)
    evaluate_fn = None
    if st.centralized_eval and spec is not None and dataset is not None:
        personal = None
        if shared is not None and initial is not None:
            personal = (shared, shared.personal_part(initial))
        evaluate_fn = _test_split_evaluation(spec, dataset, personal)

    fedavg_args: dict[str, Any] = {
        "fraction_fit": st.fraction_fit,
        "fraction_evaluate": st.fraction_evaluate,
        "min_fit_clients": st.min_fit_clients,
        "min_evaluate_clients": st.min_evaluate_clients,
        "min_available_clients": min_available_clients,
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": lambda rnd: dict(fit_config),
        "initial_parameters": (
            None
            if initial is None
            else ndarrays_to_parameters(initial if shared is None else shared.shared(initial))
        ),
        "fit_metrics_aggregation_fn": weighted_average,
        "evaluate_metrics_aggregation_fn": weighted_average,
    }
    return build_strategy(st, fit_config, fedavg_args)


def _test_split_evaluation(
    spec: ModelSpec, dataset: Dataset, personal: tuple[SharedSplit, NDArrays] | None = None
) -> Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]]]:
    """Flower's ``evaluate_fn``: the model's loss and accuracy on ``dataset``'s test split
    (with ``personal``, a shared-only model completed by those personal arrays)."""

    def evaluate_fn(
        server_round: int, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        if personal is not None:
            parameters = personal[0].merge(parameters, personal[1])
        loss, acc = evaluate_params(spec, parameters, dataset.x_test, dataset.y_test)
        return loss, {"accuracy": acc}

    return evaluate_fn


def build_experiment(cfg: ExperimentConfig) -> Experiment:
    if cfg.app:
        from fedhive.cli.user_app import app_experiment

        return app_experiment(cfg)
    dataset = load_data(cfg)
    partition = make_partition(cfg, dataset)
    spec = ModelSpec.for_data(cfg.model, dataset)
    client_fn: ClientFactory | PersonalClientFactory
    st, shared = cfg.strategy, None
    callbacks: tuple[RoundCallback, ...] = ()
    if cfg.personalization is None:
        splits = split_clients(partition, cfg.data.val_fraction, cfg.seed)
        client_fn = ClientFactory(spec, dataset.x_train, dataset.y_train, splits)
    else:
        client_fn = personal_clients(
            cfg.personalization, spec, dataset.x_train, dataset.y_train, partition,
            val_fraction=cfg.data.val_fraction, seed=cfg.seed,
        )  # fmt: skip
        shared, callbacks = client_fn.split, (PersonalizationReport(),)
        st = st.model_copy(update=evaluation_sampling(cfg.personalization, cfg.num_clients))
    train = cfg.train
    fit_config: Config = {
        "local_epochs": train.local_epochs,
        "batch_size": train.batch_size,
        "lr": train.lr,
        "momentum": train.momentum,
    }
    if train.max_steps:
        fit_config["max_steps"] = train.max_steps

    strategy, mods = model_strategy(
        st,
        spec,
        dataset,
        fit_config,
        cfg.seed,
        min_available_clients=min(cfg.num_clients, max(cfg.strategy.min_fit_clients, 1)),
        shared=shared,
    )
    return Experiment(cfg, dataset, partition, client_fn, strategy, mods, callbacks)


def _train_size(split: object) -> int:
    """Training samples of one client: a (train, val) pair or a personalization split."""
    train = split.train if isinstance(split, ClientSplit) else split[0]  # type: ignore[index]
    return len(train)


def run_experiment(
    exp: Experiment,
    *,
    callbacks: Sequence[RoundCallback] = (),
    checkpoint_dir: Path | None = None,
    model_dir: Path | None = None,
    resume: bool = False,
) -> History:
    from fedhive.cli.stragglers import run_policy
    from fedhive.simulation import start_simulation

    cfg = exp.cfg
    sim = cfg.simulation
    system = None
    if cfg.system is not None:  # each client's training set size sets its compute time
        splits = exp.client_fn.splits  # type: ignore[union-attr]  # no [system] with an app
        sizes = {str(i): _train_size(split) for i, split in enumerate(splits)}
        system = cfg.system.build(sizes, cfg.seed)
    return start_simulation(
        client_fn=exp.client_fn,
        num_clients=cfg.num_clients,
        config=ServerConfig(num_rounds=cfg.rounds, round_timeout=sim.round_timeout),
        strategy=exp.strategy,
        backend=sim.backend,
        num_workers=sim.num_workers or None,
        client_resources={str(k): v for k, v in sim.client_resources.items()} or None,
        ray_init_args=dict(sim.ray_init_args) or None,
        seed=cfg.seed,
        mods=exp.mods,
        secure_aggregation=(
            None if cfg.secure_aggregation is None else cfg.secure_aggregation.options()
        ),
        policy=run_policy(cfg.strategy, cfg.policy),
        system=system,
        callbacks=[*callbacks, *exp.callbacks],
        compression=None if cfg.compression is None else cfg.compression.build(),
        checkpoint_dir=checkpoint_dir,
        model_dir=model_dir,
        resume=resume,
    )
