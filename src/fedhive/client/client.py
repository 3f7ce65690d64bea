"""The low-level client: Flower 1.x's ``Client`` with typed instructions and results."""

from __future__ import annotations

from abc import ABC

from fedhive.client.context import HasContext
from fedhive.common.records import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    Status,
)

__all__ = ["Client"]


class Client(HasContext, ABC):
    """A client that speaks in ``FitIns``/``FitRes``, ``EvaluateIns``/``EvaluateRes``.

    Override what the client supports; the defaults answer "not implemented" with the
    matching status code, which the engine records as a failure of that client.

    Beside the model, instructions and replies carry named records (``ins.extras``,
    ``FitRes(..., extras=...)``; see :class:`~fedhive.common.records.FitRes` for the names
    fedhive reserves and the layout of a partial model). A
    :class:`~fedhive.client.NumPyClient` leaves them empty.
    """

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        status = Status(Code.GET_PROPERTIES_NOT_IMPLEMENTED, "get_properties not implemented")
        return GetPropertiesRes(status=status, properties={})

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        status = Status(Code.GET_PARAMETERS_NOT_IMPLEMENTED, "get_parameters not implemented")
        return GetParametersRes(status=status, parameters=Parameters(tensors=[]))

    def fit(self, ins: FitIns) -> FitRes:
        status = Status(Code.FIT_NOT_IMPLEMENTED, "fit not implemented")
        return FitRes(status=status, parameters=Parameters(tensors=[]), num_examples=0)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        status = Status(Code.EVALUATE_NOT_IMPLEMENTED, "evaluate not implemented")
        return EvaluateRes(status=status, loss=0.0, num_examples=0)

    def to_client(self) -> Client:
        return self
