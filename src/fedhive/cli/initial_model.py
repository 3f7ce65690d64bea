"""Where ``fedhive server``'s initial model comes from: a file, a reference model, or a
client (``[model] name = "client"``, the default; see
:class:`~fedhive.cli.server_config.DeployModelConfig`)."""

from __future__ import annotations

import zipfile
from typing import TYPE_CHECKING

from fedhive.common.errors import ConfigError
from fedhive.common.records import NDArrays

if TYPE_CHECKING:
    from fedhive.cli.experiment import ModelSpec
    from fedhive.cli.server_config import DeployModelConfig

__all__ = ["describe_model", "initial_parameters"]


def initial_parameters(
    model: DeployModelConfig, spec: ModelSpec | None, seed: int
) -> NDArrays | None:
    """The arrays of ``model.initial_parameters`` (``None`` when no file is given).

    With a reference model (``spec``), the file must have its layout: a mismatch is a
    :class:`ConfigError` naming the array and both shapes.
    """
    if not model.initial_parameters:
        return None
    from fedhive.server.checkpoint import load_npz

    path = model.initial_parameters
    try:
        arrays = load_npz(path)
    except OSError as exc:
        raise ConfigError(
            f"model.initial_parameters: cannot read {path}: {exc.strerror or exc}"
        ) from None
    except (ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ConfigError(
            f"model.initial_parameters: {path} is not a .npz of arrays arr_0, arr_1, ... "
            f"(numpy.savez(path, *arrays)): {exc}"
        ) from None
    if not arrays:
        raise ConfigError(f"model.initial_parameters: {path} holds no arrays")
    for i, arr in enumerate(arrays):
        if arr.dtype.kind not in "fiub":
            raise ConfigError(
                f"model.initial_parameters: array {i} of {path} has non-numeric dtype {arr.dtype}"
            )
    if spec is not None:
        _check_layout(arrays, spec.initial(seed), f"{path} ({spec.name})")
    return arrays


def _check_layout(arrays: NDArrays, expected: NDArrays, what: str) -> None:
    if len(arrays) != len(expected):
        raise ConfigError(
            f"model.initial_parameters: {what} expects {len(expected)} arrays, the file "
            f"holds {len(arrays)}"
        )
    for i, (arr, ref) in enumerate(zip(arrays, expected, strict=True)):
        if arr.shape != ref.shape:
            raise ConfigError(
                f"model.initial_parameters: array {i} of {what}: expected shape {ref.shape}, "
                f"received {arr.shape}"
            )


def describe_model(model: DeployModelConfig, data_name: str | None) -> str:
    """The server's start line for its model: ``"logreg on digits"``, or where the
    client's model comes from."""
    source = f" from {model.initial_parameters}" if model.initial_parameters else ""
    if model.from_client:
        if source:
            return f"the clients' model, initial parameters{source}"
        return "the clients' model (initial parameters from one client's get_parameters)"
    return f"{model.name} on {data_name}{source}"
