"""The ``[tracking]`` table of ``fedhive run`` and ``fedhive server``: where a run is
logged besides its output folder.

Each sub-table turns one tracker on (an empty one takes the defaults)::

    [tracking.tensorboard]
    logdir = "runs/tb"          # default: the output folder's tensorboard/

    [tracking.mlflow]
    tracking_uri = "http://127.0.0.1:5000"   # default: MLflow's own (MLFLOW_TRACKING_URI)
    experiment = "fedhive"
    run_name = "fedavg-alpha0.5"             # default: the output folder's name

Both log every numeric field of every round record (:mod:`fedhive.callbacks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedhive.server.engine import RoundCallback

__all__ = ["MLflowSection", "TensorBoardSection", "TrackingConfig", "tracking_callbacks"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorBoardSection(_Section):
    logdir: str = Field("", description="event file folder; default: OUT/tensorboard")
    histograms: bool = Field(True, description="per-client histograms of each round")


class MLflowSection(_Section):
    tracking_uri: str = Field("", description="MLflow tracking URI; default: MLflow's own")
    experiment: str = Field("fedhive", min_length=1)
    run_name: str = Field("", description="default: the output folder's name")


class TrackingConfig(_Section):
    tensorboard: TensorBoardSection | None = None
    mlflow: MLflowSection | None = None


def tracking_callbacks(
    cfg: TrackingConfig | None, out_dir: Path, params: dict[str, Any]
) -> list[RoundCallback]:
    """The callbacks ``cfg`` asks for (none for ``None``); ``params`` is the resolved
    config, logged as MLflow parameters. A missing package or an unusable tracking
    store is a ConfigError here, before any round runs."""
    from fedhive.callbacks import MLflow, TensorBoard

    if cfg is None:
        return []
    out: list[RoundCallback] = []
    if cfg.tensorboard is not None:
        logdir = cfg.tensorboard.logdir or str(out_dir / "tensorboard")
        out.append(TensorBoard(logdir, histograms=cfg.tensorboard.histograms))
    if cfg.mlflow is not None:
        section = cfg.mlflow
        out.append(
            MLflow(
                tracking_uri=section.tracking_uri or None,
                experiment=section.experiment,
                run_name=section.run_name or out_dir.name,
                params=params,
            )
        )
    return out
