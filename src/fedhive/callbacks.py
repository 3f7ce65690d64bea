"""Round callbacks that log a run to the trackers people already use.

:class:`TensorBoard` writes event files (``pip install 'fedhive[tensorboard]'``) and
:class:`MLflow` logs to an MLflow tracking store (``pip install 'fedhive[mlflow]'``).
Both log *every* numeric field of every round record (:func:`round_scalars`), with the
round as the step: accuracy and loss (centralized and distributed), fit metrics such as
``epsilon``, the bytes moved (``bytes_up``, ``bytes_down``), ``virtual_time_s``,
``elapsed_s``, failure counts, the model version. Pass them to any entry point that
takes ``callbacks`` (``start_simulation``, ``start_server``), or name them in the
``[tracking]`` table of ``fedhive run`` / ``fedhive server``::

    import fedhive
    from fedhive.callbacks import TensorBoard

    fedhive.simulation.start_simulation(..., callbacks=[TensorBoard("runs/tb")])

The tracker's package is imported when the callback is made, so ``import fedhive``
stays light and a missing package is reported before any round runs.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedhive.common.errors import ConfigError, FedhiveError
from fedhive.server.engine import Engine, RoundCallback
from fedhive.server.history import History

__all__ = ["MLflow", "TensorBoard", "client_values", "flat_params", "round_scalars"]

#: Per-client maps of a round record: logged as their size (and, in TensorBoard, as
#: histograms of each numeric field across clients), not as one series per client.
PER_CLIENT = frozenset({"bytes_clients", "distributed/clients"})


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _walk(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    number = _number(value)
    if number is not None:
        yield prefix, number
    elif isinstance(value, Mapping):
        if prefix in PER_CLIENT:
            yield f"{prefix}/count", float(len(value))
            return
        for key, child in value.items():
            yield from _walk(f"{prefix}/{key}" if prefix else str(key), child)
    elif isinstance(value, list | tuple):
        yield f"{prefix}/count", float(len(value))
    # strings, bytes and None carry no number: nothing to plot


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric field of a round record by its path (``"centralized/accuracy"``,
    ``"fit/metrics/epsilon"``, ``"bytes_up"``, ``"virtual_time_s"``), booleans as 0/1,
    lists and per-client maps by their length (``"failures/count"``). ``round`` is the
    step, not a value."""
    return dict(_walk("", {k: v for k, v in record.items() if k != "round"}))


def client_values(record: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per-client values of one round for histograms: ``distributed/clients/loss``,
    ``distributed/clients/accuracy`` (each client's evaluation), ``bytes_clients/up``
    and ``bytes_clients/down``."""
    out: dict[str, list[float]] = {}
    clients = (record.get("distributed") or {}).get("clients") or []
    for client in clients:
        if not isinstance(client, Mapping):
            continue
        fields = {"loss": client.get("loss"), **(client.get("metrics") or {})}
        for key, value in fields.items():
            number = _number(value)
            if number is not None and math.isfinite(number):
                out.setdefault(f"distributed/clients/{key}", []).append(number)
    for moved in (record.get("bytes_clients") or {}).values():
        for direction in ("up", "down"):
            number = _number((moved or {}).get(direction))
            if number is not None:
                out.setdefault(f"bytes_clients/{direction}", []).append(number)
    return out


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"strategy.name": "fedavg", ...}`` (values as text)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_params(value, name))
        else:
            out[name] = str(value)
    return out


def _missing(package: str, extra: str) -> ConfigError:
    return ConfigError(
        f"the {package} package is not installed; pip install 'fedhive[{extra}]' "
        f"(or pip install {package})"
    )


class TensorBoard(RoundCallback):
    """Write every round's fields to TensorBoard event files under ``logdir``.

    Scalars are tagged by their path in the round record (``centralized/accuracy``,
    ``fit/metrics/epsilon``, ``bytes_up``, ``virtual_time_s``; see
    :func:`round_scalars`) with the round as the step; with ``histograms`` (default on),
    the per-client evaluation results and bytes of each round are histograms too. Files
    are flushed after every round, so ``tensorboard --logdir LOGDIR`` follows a run as it
    goes. A resumed run writes the rounds it resumes from again, after a marker that
    tells TensorBoard to drop what an earlier attempt had logged from those steps on.

    The events are written with the ``tensorboard`` package's own writer and protocol
    buffers (no TensorFlow, no PyTorch).
    """

    def __init__(self, logdir: str | Path, *, histograms: bool = True) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.logdir = Path(logdir)
        self.histograms = histograms
        self._event, self._summary = event_pb2, summary_pb2
        self._writer_type = EventFileWriter
        self.writer: Any = None

    def on_run_start(self, engine: Engine) -> None:
        rounds = engine.history.rounds
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = self._writer_type(str(self.logdir))
        if rounds:  # TensorBoard drops earlier events from this step on
            start = self._event.SessionLog(status=self._event.SessionLog.START)
            self._write(int(rounds[0]["round"]), session_log=start)
        for record in rounds:  # round 0 (the initial model), or those resumed from
            self._log(record)
        self.writer.flush()

    def _write(self, step: int, **content: Any) -> None:
        self.writer.add_event(self._event.Event(wall_time=time.time(), step=step, **content))

    def _log(self, record: Mapping[str, Any]) -> None:
        step = int(record["round"])
        Value = self._summary.Summary.Value
        values = [Value(tag=t, simple_value=v) for t, v in round_scalars(record).items()]
        if self.histograms:
            for tag, numbers in client_values(record).items():
                values.append(Value(tag=tag, histo=self._histogram(numbers)))
        self._write(step, summary=self._summary.Summary(value=values))

    def _histogram(self, numbers: list[float]) -> Any:
        import numpy as np

        data = np.asarray(numbers, dtype=np.float64)
        counts, edges = np.histogram(data, bins=min(30, max(1, len(data))))
        return self._summary.HistogramProto(
            min=float(data.min()),
            max=float(data.max()),
            num=float(data.size),
            sum=float(data.sum()),
            sum_squares=float(np.dot(data, data)),
            bucket_limit=[float(e) for e in edges[1:]],  # each bucket's right edge
            bucket=[float(c) for c in counts],
        )

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self._log(record)
        self.writer.flush()

    def on_run_end(self, engine: Engine, history: History) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflow(RoundCallback):
    """Log every round's fields to an MLflow run, with the round as the step.

    ``tracking_uri`` is MLflow's (``None``: its own default, ``MLFLOW_TRACKING_URI``);
    the run goes into ``experiment`` (made if missing) under ``run_name``, with
    ``params`` (a nested config, flattened to ``"strategy.name"`` keys; the run's config
    when ``None``) and ``tags``. Metrics are named by their path in the round record, as
    :func:`round_scalars` gives them. The run ends FINISHED, or KILLED (Ctrl-C) or FAILED
    when the run stopped on an exception. Every start, a resumed one too, is a new MLflow
    run holding every round so far.

    MLflow 3 keeps a local folder store (``file:./mlruns``) only with
    ``MLFLOW_ALLOW_FILE_STORE=true`` in the environment; a database store
    (``sqlite:///mlflow.db``) needs the full ``mlflow`` package, and a tracking server
    (``http://...``) works with ``mlflow-skinny``, which the ``mlflow`` extra installs.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "fedhive",
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self.experiment = experiment
        self.run_name = run_name
        self.params = params
        self.tags = dict(tags or {})
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id if found else self.client.create_experiment(experiment)
            )
        except MlflowException as exc:
            raise ConfigError(f"MLflow tracking store {tracking_uri!r}: {exc.message}") from None
        self.run_id: str | None = None

    def on_run_start(self, engine: Engine) -> None:
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        params = self.params if self.params is not None else engine.history.config
        self._log_params(flat_params(params))
        for record in engine.history.rounds:
            self._log(record)

    def _run_id(self) -> str:
        if self.run_id is None:
            raise FedhiveError("MLflow callback used before on_run_start created its run")
        return self.run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        run_id = self._run_id()
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(run_id, params=items[start : start + 100])

    def _log(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self._run_id()
        step = int(record["round"])
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in round_scalars(record).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self._log(record)

    def on_run_end(self, engine: Engine, history: History) -> None:
        if self.run_id is None:
            return
        stopped = sys.exc_info()[0]  # the exception the run is ending on, if any
        status = "FINISHED"
        if stopped is not None:
            status = "KILLED" if issubclass(stopped, KeyboardInterrupt) else "FAILED"
        self.client.set_terminated(self.run_id, status=status)
        self.run_id = None
