"""Flower 1.x's ``NumPyClient``: parameters as lists of numpy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedhive.client.client import Client
from fedhive.client.context import Context, HasContext
from fedhive.common.errors import ProtocolError
from fedhive.common.records import (
    Config,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    NDArrays,
    Scalar,
    Status,
    check_scalar_mapping,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

__all__ = ["NumPyClient"]


class NumPyClient(HasContext):
    """Subclass and override ``get_parameters``, ``fit`` and ``evaluate``.

    Example::

        class MyClient(fedhive.client.NumPyClient):
            def get_parameters(self, config):
                return [w.copy() for w in self.weights]

            def fit(self, parameters, config):
                new = [p + 1 for p in parameters]
                return new, 10, {}

    ``fit`` returns ``(parameters, num_examples, metrics)`` and ``evaluate`` returns
    ``(loss, num_examples, metrics)``. The arrays a client receives are its own copies.
    """

    def get_properties(self, config: Config) -> dict[str, Scalar]:
        return {}

    def get_parameters(self, config: Config) -> NDArrays:
        raise NotImplementedError("this NumPyClient does not implement get_parameters")

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        raise NotImplementedError("this NumPyClient does not implement fit")

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        raise NotImplementedError("this NumPyClient does not implement evaluate")

    def to_client(self) -> Client:
        """Wrap this client in the low-level :class:`Client` interface."""
        return _NumPyClientAdapter(self)


def _check_arrays(value: Any, method: str) -> NDArrays:
    if isinstance(value, np.ndarray) and value.ndim >= 1:
        # Flower iterates whatever it gets: a bare array is the list of its rows
        value = [np.asarray(row) for row in value]
    if not isinstance(value, list | tuple):
        raise ProtocolError(f"{method} must return a list of numpy arrays, got {type(value)}")
    out = []
    for i, arr in enumerate(value):
        if not isinstance(arr, np.ndarray):
            raise ProtocolError(
                f"{method} returned element {i} of type {type(arr).__name__}, "
                "expected numpy.ndarray"
            )
        out.append(arr)
    return out


def _check_count(value: Any, method: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ProtocolError(f"{method} must return num_examples as an int >= 0, got {value!r}")
    return int(value)


def _check_triple(value: Any, method: str) -> tuple[Any, Any, Any]:
    if not isinstance(value, tuple | list) or len(value) != 3:
        raise ProtocolError(f"{method} must return a 3-tuple, got {type(value).__name__}")
    return value[0], value[1], value[2]


class _NumPyClientAdapter(Client):
    def __init__(self, numpy_client: NumPyClient) -> None:
        self.numpy_client = numpy_client

    @property
    def context(self) -> Context:
        return self.numpy_client.context

    @context.setter
    def context(self, value: Context) -> None:
        self.numpy_client.context = value

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        props = self.numpy_client.get_properties(dict(ins.config))
        return GetPropertiesRes(Status(), check_scalar_mapping(props, "get_properties result"))

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        arrays = _check_arrays(self.numpy_client.get_parameters(dict(ins.config)), "get_parameters")
        return GetParametersRes(Status(), ndarrays_to_parameters(arrays))

    def fit(self, ins: FitIns) -> FitRes:
        arrays = parameters_to_ndarrays(ins.parameters)
        params, num, metrics = _check_triple(self.numpy_client.fit(arrays, dict(ins.config)), "fit")
        return FitRes(
            Status(),
            ndarrays_to_parameters(_check_arrays(params, "fit")),
            _check_count(num, "fit"),
            check_scalar_mapping(metrics, "fit metrics"),
        )

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        arrays = parameters_to_ndarrays(ins.parameters)
        loss, num, metrics = _check_triple(
            self.numpy_client.evaluate(arrays, dict(ins.config)), "evaluate"
        )
        if isinstance(loss, bool) or not isinstance(loss, int | float | np.number):
            raise ProtocolError(f"evaluate must return the loss as a float, got {loss!r}")
        return EvaluateRes(
            Status(),
            float(loss),
            _check_count(num, "evaluate"),
            check_scalar_mapping(metrics, "evaluate metrics"),
        )
