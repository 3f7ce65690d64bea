"""The built-in demo client of ``fedhive client --demo``: the simulation's client on one
fixed partition of a built-in data set, the same partition on every run of a site."""

from __future__ import annotations

from dataclasses import dataclass

from fedhive.cli.deploy_common import experiment_config
from fedhive.cli.experiment import (
    ModelSpec,
    SimClient,
    load_data,
    make_partition,
    split_clients,
)
from fedhive.cli.server_config import DeployTrainConfig
from fedhive.client.context import Context
from fedhive.common.errors import ConfigError
from fedhive.common.records import Config, NDArray, NDArrays, Scalar

__all__ = ["DemoClient", "DemoClientFn", "demo_client_fn"]


class DemoClient(SimClient):
    """The simulation's client; training settings the server does not send get defaults.

    Its ``get_parameters`` is the reference model initialised from the demo's seed (the
    same on every site), for a server that takes the initial model from a client.
    """

    seed: int = 0

    def get_parameters(self, config: Config) -> NDArrays:
        return self.spec.initial(self.seed)

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return super().fit(parameters, {**DeployTrainConfig().model_dump(), **config})


@dataclass
class DemoClientFn:
    """``client_fn`` of the built-in demo client: one fixed partition of a data set."""

    spec: ModelSpec
    train: tuple[NDArray, NDArray]
    val: tuple[NDArray, NDArray]
    partition_id: int
    num_partitions: int
    seed: int = 0

    def __call__(self, context: Context) -> DemoClient:
        context.node_config.setdefault("partition-id", self.partition_id)
        context.node_config.setdefault("num-partitions", self.num_partitions)
        client = DemoClient(self.spec, self.train, self.val)
        client.seed = self.seed
        return client


def demo_client_fn(
    *,
    partition_id: int,
    num_partitions: int,
    dataset: str,
    num_samples: int,
    partition: str,
    alpha: float,
    val_fraction: float,
    model: str,
    hidden: int,
    seed: int,
) -> tuple[DemoClientFn, str]:
    """The demo client's ``client_fn`` and a line describing what it holds.

    The options are validated as ``fedhive run``'s ``[data]`` and ``[model]``; an error
    names the command-line flag, not the config key behind it.
    """
    if num_partitions < 1:
        raise ConfigError(f"--num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"--partition-id must be in [0, {num_partitions}) for --num-partitions "
            f"{num_partitions}, got {partition_id}"
        )
    data_cfg = {
        "dataset": dataset,
        "num_samples": num_samples,
        "partition": partition,
        "alpha": alpha,
        "val_fraction": val_fraction,
    }
    model_cfg = {"name": model, "hidden": hidden}
    try:
        cfg = experiment_config(seed, data_cfg, model_cfg, num_partitions, "demo")
    except ConfigError as exc:
        text = str(exc).replace("invalid configuration", "invalid demo client options")
        flags = {f"data.{k}": k for k in data_cfg} | {
            "model.name": "model",
            "model.hidden": "hidden",
        }
        for dotted, name in flags.items():
            text = text.replace(f"demo: {dotted} =", "--" + name.replace("_", "-") + " =")
        raise ConfigError(text) from None
    data = load_data(cfg)
    parts = make_partition(cfg, data)
    train_idx, val_idx = split_clients(parts, cfg.data.val_fraction, cfg.seed)[partition_id]
    spec = ModelSpec.for_data(cfg.model, data)
    fn = DemoClientFn(
        spec,
        (data.x_train[train_idx], data.y_train[train_idx]),
        (data.x_train[val_idx], data.y_train[val_idx]),
        partition_id,
        num_partitions,
        seed,
    )
    line = (
        f"demo client: partition {partition_id} of {num_partitions} ({partition}) of "
        f"{data.name}: {len(train_idx)} train / {len(val_idx)} held-out samples, "
        f"model {model}"
    )
    return fn, line
