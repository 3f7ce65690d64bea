"""``fedhive run`` with ``app = "MODULE:ATTR"``: simulate the user's own client.

The app is imported from ``app_dir`` (the config file's folder unless given) and may be a
``ClientApp``, a ``client_fn`` or a ``NumPyClient``/``Client`` instance, as for ``fedhive
client --app``. The strategy is ``[strategy]``'s, sending ``[train]``'s values as each
round's fit config; the initial model comes from one client (as in Flower when the
server holds none) and evaluation is federated only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhive.cli.client_cmd import client_target, load_app
from fedhive.common.records import Config

if TYPE_CHECKING:
    from fedhive.cli.config import ExperimentConfig
    from fedhive.cli.experiment import Experiment

__all__ = ["app_experiment", "with_app_dir"]


def with_app_dir(cfg: ExperimentConfig, config_file: Path | None) -> ExperimentConfig:
    """``cfg`` with ``app_dir`` made absolute: the config file's folder by default (the
    working directory without a file), so a resumed run finds the app again."""
    if not cfg.app:
        return cfg
    base = config_file.parent if config_file is not None else Path.cwd()
    folder = Path(cfg.app_dir) if cfg.app_dir else base
    if not folder.is_absolute():
        folder = base / folder
    return cfg.model_copy(update={"app_dir": str(folder.resolve())})


def app_experiment(cfg: ExperimentConfig) -> Experiment:
    """The experiment of a config with ``app``: the user's clients, ``[strategy]``."""
    from fedhive.cli.experiment import Experiment, model_strategy

    target, app_mods = client_target(load_app(cfg.app, cfg.app_dir or "."), cfg.app)
    client_fn: Any = target.get("client_fn")
    if client_fn is None:
        client = target["client"]

        def client_fn(context: Any) -> Any:
            return client

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
        cfg.strategy,
        None,
        None,
        fit_config,
        cfg.seed,
        min_available_clients=min(cfg.num_clients, max(cfg.strategy.min_fit_clients, 1)),
    )
    return Experiment(cfg, None, None, client_fn, strategy, (*app_mods, *mods))
