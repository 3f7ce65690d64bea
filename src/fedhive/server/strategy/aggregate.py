"""Streaming aggregation of model updates.

:class:`WeightedMean` folds one update at a time into a float64 accumulator, so a round
costs O(model) memory whatever the number of clients: the accumulator (8 bytes per
parameter) plus one scratch buffer the size of the largest layer.

Dtype rules for replies, checked against the current global model:

- floating layers: any float reply is accepted and the mean is cast back to the global
  layer's dtype (a float64 reply to a float32 model yields float32);
- integer and bool layers: averaged as real numbers, so the result is float64, as Flower's
  ``aggregate`` does (``num_batches_tracked`` becomes a float64 mean);
- complex, object, string or other non-numeric replies are refused, as are NaN/Inf
  values, a wrong number of arrays or a wrong shape.

A refused update raises :class:`~fedhive.common.errors.InvalidUpdate` before anything is
folded, so the aggregate never holds part of a bad update.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedhive.common.errors import InvalidUpdate
from fedhive.common.records import NDArray, NDArrays

__all__ = ["WeightedMean", "check_update", "is_finite"]

_NUMERIC_KINDS = frozenset("biuf")


def is_finite(array: NDArray) -> bool:
    """True when no element is NaN or +-Inf.

    A finite sum proves it (NaN and Inf propagate); only when the sum is not finite, which
    overflow can also cause, is every element checked.
    """
    if array.dtype.kind != "f" or array.size == 0:
        return True
    if np.isfinite(np.add.reduce(array, axis=None)):
        return True
    return bool(np.isfinite(array).all())


def check_update(
    arrays: Sequence[NDArray],
    reference: Sequence[NDArray],
    *,
    client_id: str,
    server_round: int,
    stage: str = "fit",
) -> None:
    """Raise :class:`InvalidUpdate` unless ``arrays`` matches ``reference`` and is finite."""

    def refuse(reason: str) -> InvalidUpdate:
        return InvalidUpdate(client_id, server_round, stage, reason)

    if len(arrays) != len(reference):
        raise refuse(f"expected {len(reference)} arrays, got {len(arrays)}")
    for i, (arr, ref) in enumerate(zip(arrays, reference, strict=True)):
        if not isinstance(arr, np.ndarray):
            raise refuse(f"array {i} is a {type(arr).__name__}, not a numpy array")
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise refuse(f"array {i} has non-numeric dtype {arr.dtype}")
        if arr.shape != ref.shape:
            raise refuse(f"array {i} has shape {arr.shape}, expected {ref.shape}")
        if not is_finite(arr):
            raise refuse(f"array {i} contains NaN or Inf")


class WeightedMean:
    """Running weighted mean of lists of arrays, one list at a time.

    ``reference`` gives the layout (count, shapes, dtypes) that every update must match.
    """

    def __init__(self, reference: Sequence[NDArray]) -> None:
        self.reference = list(reference)
        self._acc = [np.zeros(r.shape, dtype=np.float64) for r in self.reference]
        largest = max((r.size for r in self.reference), default=0)
        self._scratch = np.empty(largest, dtype=np.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(
        self,
        arrays: Sequence[NDArray],
        weight: float,
        *,
        client_id: str,
        server_round: int,
        check: bool = True,
    ) -> None:
        """Validate (unless the caller already did: ``check=False``), then fold."""
        if check:
            check_update(arrays, self.reference, client_id=client_id, server_round=server_round)
        if not np.isfinite(weight) or weight < 0:
            raise InvalidUpdate(client_id, server_round, "fit", f"invalid weight {weight!r}")
        for acc, arr in zip(self._acc, arrays, strict=True):
            scratch = self._scratch[: arr.size].reshape(arr.shape)
            np.multiply(arr, weight, out=scratch, dtype=np.float64)
            np.add(acc, scratch, out=acc)
        self.total_weight += weight
        self.count += 1

    def result(self) -> NDArrays | None:
        """The weighted mean, in the model's dtypes; ``None`` when the total weight is 0.

        Ends the aggregation: the accumulator is divided in place.
        """
        if self.total_weight <= 0:
            return None
        out = []
        for acc, ref in zip(self._acc, self.reference, strict=True):
            np.divide(acc, self.total_weight, out=acc)
            out.append(acc.astype(ref.dtype) if ref.dtype.kind == "f" else acc)
        self._acc = []
        return out
