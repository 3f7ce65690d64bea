"""The codec interface and the checks every codec shares (see :mod:`fedhive.compression.codecs`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from fedhive.common.errors import ConfigError, SerdeError
from fedhive.common.records import NDArray, Scalar

__all__ = ["Codec", "Encoded"]

#: What an encode gives: named raw arrays, and scalars describing them.
Encoded = tuple[dict[str, NDArray], dict[str, Scalar]]


def _expect(fields_: Mapping[str, NDArray], spec: Mapping[str, tuple[str, int | None]]) -> None:
    """Exactly the arrays ``spec`` names, each 1-D of its dtype (and size, when given)."""
    if set(fields_) != set(spec):
        raise SerdeError(f"expected payload arrays {sorted(spec)}, got {sorted(fields_)}")
    for name, (dtype, size) in spec.items():
        arr = fields_[name]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype) or arr.ndim != 1:
            got = f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}"
            raise SerdeError(f"payload array {name!r} must be 1-D {dtype}, got {got}")
        if size is not None and arr.size != size:
            raise SerdeError(f"payload array {name!r} must hold {size} values, got {arr.size}")


def _finite_scales(scales: NDArray, name: str = "scales") -> NDArray:
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise SerdeError(f"payload {name} must be finite and >= 0")
    return scales


def _starts(size: int, segments: Sequence[int], block: int | None) -> NDArray:
    """Start offsets of the scale blocks: one per array (``block`` None) or fixed size."""
    if block is None:
        lengths = [s for s in segments if s > 0]
        return np.cumsum([0, *lengths[:-1]], dtype=np.int64) if lengths else np.zeros(0, np.int64)
    return np.arange(0, size, block, dtype=np.int64)


def _ratio_k(ratio: float, size: int) -> int:
    return 0 if size == 0 else min(size, max(1, round(ratio * size)))


def _check_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ConfigError(f"ratio must be a number in (0, 1], got {ratio!r}")


def _check_bits(bits: object, low: int, high: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ConfigError(f"bits must be an int in [{low}, {high}], got {bits!r}")


def _check_block(block: object, power_of_two: bool = False) -> None:
    if block is None and not power_of_two:
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ConfigError(f"block must be None or an int >= 1, got {block!r}")
    if power_of_two and (block < 2 or block & (block - 1)):
        raise ConfigError(f"block must be a power of two >= 2, got {block!r}")


@dataclass(frozen=True, kw_only=True)
class Codec(ABC):
    """An update codec. ``error_feedback``: the client keeps what it did not send and adds
    it to its next update (Stich et al. 2018; Karimireddy et al. 2019). Arrays of fewer
    than ``min_size`` elements (biases, norms) travel uncompressed.

    Subclasses declare ``id``, whether decoding is unbiased (``unbiased``), and whether
    the encoding is a sum-preserving integer vector that secure aggregation can add
    (``secagg_reason`` is empty then; else it says why not).
    """

    error_feedback: bool = False
    min_size: int = 256

    id: ClassVar[str] = ""
    unbiased: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(f"error_feedback must be a bool, got {self.error_feedback!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int):
            raise ConfigError(f"min_size must be an int >= 0, got {self.min_size!r}")
        if self.min_size < 0:
            raise ConfigError(f"min_size must be an int >= 0, got {self.min_size!r}")

    def params(self) -> dict[str, Scalar]:
        """The codec's parameters as scalars (what a task tells the client)."""
        out: dict[str, Scalar] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    @property
    def secagg_reason(self) -> str:
        """Why this codec cannot run under secure aggregation ("" when it can)."""
        return (
            f"{self.id} encodes each client's update with its own scale or support, so the "
            "masked sum of encodings is not the encoding of the sum"
        )

    @abstractmethod
    def encode(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> Encoded:
        """Encode the float32 vector ``x`` (arrays of lengths ``segments``); ``seed`` is
        the round's shared seed (randomk with a shared seed)."""

    @abstractmethod
    def decode(
        self,
        arrays: Mapping[str, NDArray],
        info: Mapping[str, Scalar],
        segments: Sequence[int],
        seed: int = 0,
    ) -> NDArray:
        """The float32 vector behind ``arrays``; :class:`SerdeError` if malformed."""

    def roundtrip(
        self, x: NDArray, segments: Sequence[int], rng: np.random.Generator, seed: int = 0
    ) -> tuple[Encoded, NDArray]:
        """Encode ``x`` and decode it again (what error feedback subtracts)."""
        encoded = self.encode(x, segments, rng, seed)
        return encoded, self.decode(encoded[0], encoded[1], segments, seed)
