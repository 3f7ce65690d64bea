"""Records that cross the boundary between server and clients.

Parameters are an ordered list of numpy arrays. Config and metrics values are ``bool``,
``bytes``, ``float``, ``int`` or ``str``. The Flower 1.x message classes (``FitIns``,
``FitRes``, ...) keep their names and fields so that code written for them runs unchanged;
``FitIns``, ``FitRes``, ``EvaluateIns`` and ``EvaluateRes`` add named ``extras`` (a
:class:`RecordDict`, last and optional) for what travels beside the model (see
:class:`FitRes` for the reserved names and the layout of partial models).

:class:`Parameters` keeps the arrays themselves while they stay in one process and only
turns them into bytes when asked (``.tensors``), so simulation never serializes.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from fedhive.common.errors import SerdeError

__all__ = [
    "NDArray",
    "NDArrays",
    "Scalar",
    "Config",
    "Metrics",
    "Code",
    "Status",
    "Parameters",
    "FitIns",
    "FitRes",
    "EvaluateIns",
    "EvaluateRes",
    "GetParametersIns",
    "GetParametersRes",
    "GetPropertiesIns",
    "GetPropertiesRes",
    "RecordDict",
    "RESERVED_EXTRAS",
    "LAYERS_RECORD",
    "layers_record",
    "present_layers",
    "ndarrays_to_parameters",
    "parameters_to_ndarrays",
    "ndarray_to_bytes",
    "bytes_to_ndarray",
    "check_scalar_mapping",
    "ConfigsRecord",
    "DisconnectRes",
    "MetricsRecord",
    "Properties",
    "ReconnectIns",
    "RecordSet",
]

NDArray: TypeAlias = npt.NDArray[Any]
NDArrays: TypeAlias = list[NDArray]
Scalar: TypeAlias = bool | bytes | float | int | str
Config: TypeAlias = dict[str, Scalar]
Metrics: TypeAlias = dict[str, Scalar]

_SCALAR_TYPES = (bool, bytes, float, int, str)


def check_scalar_mapping(values: Mapping[str, Any], what: str) -> dict[str, Scalar]:
    """Return a plain dict copy of ``values``, refusing keys or values of other types.

    numpy scalars (``np.float32(0.5)``) are accepted and turned into Python scalars.
    """
    if not isinstance(values, Mapping):
        raise SerdeError(f"{what} must be a mapping of str to scalar, got {type(values).__name__}")
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise SerdeError(f"{what} keys must be str, got {key!r} ({type(key).__name__})")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, _SCALAR_TYPES):
            raise SerdeError(
                f"{what}[{key!r}] must be bool, bytes, float, int or str; "
                f"got {type(value).__name__}"
            )
        out[key] = value
    return out


class Code(IntEnum):
    """Status codes of client replies (Flower's values)."""

    OK = 0
    GET_PROPERTIES_NOT_IMPLEMENTED = 1
    GET_PARAMETERS_NOT_IMPLEMENTED = 2
    FIT_NOT_IMPLEMENTED = 3
    EVALUATE_NOT_IMPLEMENTED = 4


@dataclass
class Status:
    code: Code = Code.OK
    message: str = "Success"


def ndarray_to_bytes(array: NDArray) -> bytes:
    """One array as ``.npy`` bytes (never pickled)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def bytes_to_ndarray(data: bytes) -> NDArray:
    """Read ``.npy`` bytes back into a writable array; objects and pickles are refused."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SerdeError(f"not a valid .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise SerdeError(f"expected one .npy array, got {type(array).__name__}")
    return array


class Parameters:
    """Model parameters: an ordered list of arrays.

    Built from arrays (:func:`ndarrays_to_parameters`) it holds them as they are; built
    from bytes (``Parameters(tensors=[...], tensor_type="numpy.ndarray")``, as Flower code
    does) it decodes them on first use. ``tensors`` gives the Flower bytes form on demand.
    """

    __slots__ = ("_arrays", "_tensors", "tensor_type")

    def __init__(
        self,
        tensors: Sequence[bytes] | None = None,
        tensor_type: str = "numpy.ndarray",
        *,
        arrays: Sequence[NDArray] | None = None,
    ) -> None:
        if (tensors is None) == (arrays is None):
            raise TypeError("Parameters takes exactly one of `tensors` or `arrays`")
        self.tensor_type = tensor_type
        self._tensors: list[bytes] | None = None if tensors is None else list(tensors)
        self._arrays: list[NDArray] | None = None if arrays is None else list(arrays)

    @property
    def tensors(self) -> list[bytes]:
        if self._tensors is None:
            self._tensors = [ndarray_to_bytes(a) for a in self.arrays]
        return self._tensors

    @tensors.setter
    def tensors(self, value: Sequence[bytes]) -> None:
        self._tensors = list(value)
        self._arrays = None

    @property
    def arrays(self) -> list[NDArray]:
        if self._arrays is None:
            if self.tensor_type not in ("numpy.ndarray", ""):
                raise SerdeError(
                    f"cannot decode tensors of type {self.tensor_type!r}; "
                    "only 'numpy.ndarray' is understood"
                )
            self._arrays = [bytes_to_ndarray(t) for t in self._tensors or []]
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays) if self._arrays is not None else len(self._tensors or [])

    def __repr__(self) -> str:
        shapes = [tuple(a.shape) for a in self.arrays]
        return f"Parameters(shapes={shapes}, tensor_type={self.tensor_type!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Parameters):
            return NotImplemented
        a, b = self.arrays, other.arrays
        return len(a) == len(b) and all(
            x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
            for x, y in zip(a, b, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]


def ndarrays_to_parameters(ndarrays: Iterable[NDArray]) -> Parameters:
    """Wrap a list of arrays (no copy, no serialization)."""
    return Parameters(arrays=[np.asarray(a) for a in ndarrays])


def parameters_to_ndarrays(parameters: Parameters) -> NDArrays:
    """The arrays of ``parameters`` as a new list (the arrays themselves are shared)."""
    return list(parameters.arrays)


class RecordDict:
    """Typed records for messages and per-client state.

    Three groups of named records:

    - ``array_records``: ``name -> {key: ndarray}`` (ordered),
    - ``config_records``: ``name -> {key: scalar}``,
    - ``metric_records``: ``name -> {key: int | float}``.

    Flower 1.10's spellings ``parameters_records``, ``configs_records`` and
    ``metrics_records`` name the same dicts.
    """

    __slots__ = ("array_records", "config_records", "metric_records")

    def __init__(
        self,
        array_records: Mapping[str, Mapping[str, NDArray]] | None = None,
        config_records: Mapping[str, Mapping[str, Scalar]] | None = None,
        metric_records: Mapping[str, Mapping[str, int | float]] | None = None,
    ) -> None:
        # Every message carries one (``extras``), mostly empty: keep that case cheap.
        self.array_records: dict[str, dict[str, NDArray]] = (
            {k: dict(v) for k, v in array_records.items()} if array_records else {}
        )
        self.config_records: dict[str, dict[str, Scalar]] = (
            {k: dict(v) for k, v in config_records.items()} if config_records else {}
        )
        self.metric_records: dict[str, dict[str, int | float]] = (
            {k: dict(v) for k, v in metric_records.items()} if metric_records else {}
        )

    @property
    def parameters_records(self) -> dict[str, dict[str, NDArray]]:
        return self.array_records

    @property
    def configs_records(self) -> dict[str, dict[str, Scalar]]:
        return self.config_records

    @property
    def metrics_records(self) -> dict[str, dict[str, int | float]]:
        return self.metric_records

    def nbytes(self) -> int:
        """Bytes held by the arrays (what decides whether state goes to disk)."""
        return sum(a.nbytes for rec in self.array_records.values() for a in rec.values())

    def is_empty(self) -> bool:
        return not (self.array_records or self.config_records or self.metric_records)

    def copy(self) -> RecordDict:
        """A deep copy (arrays copied too)."""
        if not (self.array_records or self.config_records or self.metric_records):
            return RecordDict()
        return RecordDict(
            {k: {n: a.copy() for n, a in v.items()} for k, v in self.array_records.items()},
            self.config_records,
            self.metric_records,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordDict):
            return NotImplemented
        if self.config_records != other.config_records:
            return False
        if self.metric_records != other.metric_records:
            return False
        if self.array_records.keys() != other.array_records.keys():
            return False
        for name, rec in self.array_records.items():
            orec = other.array_records[name]
            if list(rec) != list(orec):
                return False
            for key, arr in rec.items():
                o = orec[key]
                if arr.dtype != o.dtype or arr.shape != o.shape or not np.array_equal(arr, o):
                    return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"RecordDict(array_records={list(self.array_records)}, "
            f"config_records={list(self.config_records)}, "
            f"metric_records={list(self.metric_records)})"
        )


@dataclass
class GetPropertiesIns:
    config: Config


@dataclass
class GetPropertiesRes:
    status: Status
    properties: dict[str, Scalar]


@dataclass
class GetParametersIns:
    config: Config


@dataclass
class GetParametersRes:
    status: Status
    parameters: Parameters


#: Names of ``extras`` records reserved for fedhive's own features (name -> feature); a
#: feature also owns the names ``"<name>.<part>"`` (one record name is declared once, in
#: one group). A user's own extras should use a prefix of their own (``"myorg.x"``).
RESERVED_EXTRAS: Mapping[str, str] = {
    "scaffold": "SCAFFOLD control variates (an array record like the model)",
    "codec": "encoded (compressed) payloads with their codec id and parameters",
    "layers": "partial models: which model arrays the reply carries (a config record)",
}
#: The config record of ``FitRes.extras`` naming the model arrays a partial reply carries.
LAYERS_RECORD = "layers"


@dataclass
class FitIns:
    """A fit instruction: the model, the config and named ``extras`` beside them.

    ``extras`` carries what a strategy sends beside the model (SCAFFOLD's server control
    variate, record ``"scaffold"``); see :class:`FitRes` for the naming conventions.
    """

    parameters: Parameters
    config: Config
    extras: RecordDict = field(default_factory=RecordDict)


@dataclass
class FitRes:
    """A fit reply: the trained model arrays, ``num_examples``, metrics and ``extras``.

    The update record is ``parameters`` (the model arrays, in the model's order) plus the
    named records of ``extras`` (a :class:`RecordDict`). Flower-style clients leave
    ``extras`` empty; mods and low-level :class:`~fedhive.client.Client` code set it. What
    a reply must carry is the layout its strategy declares
    (``strategy.traits.layout``, :class:`~fedhive.server.strategy.UpdateLayout`); the
    server refuses replies that do not match it, and extras it did not declare.

    Names are reserved per feature (:data:`RESERVED_EXTRAS`); each name is used in one
    group only:

    - ``array_records["scaffold"]``: SCAFFOLD's control-variate delta, arrays ``"0"``,
      ``"1"``, ... with the model's shapes (in :class:`FitIns`: the server variate);
    - ``"codec"`` and ``"codec.<part>"``: an encoded payload, its codec id and
      parameters (compression);
    - ``config_records["layers"]``: a partial model. Entry ``str(j)`` is the index in the
      global model of ``parameters`` array ``j``, for ``j = 0 .. len(parameters) - 1``,
      indices strictly increasing (build it with :func:`layers_record`, read it with
      :func:`present_layers`). Layers not named stay with the client.
    """

    status: Status
    parameters: Parameters
    num_examples: int
    metrics: dict[str, Scalar] = field(default_factory=dict)
    extras: RecordDict = field(default_factory=RecordDict)


@dataclass
class EvaluateIns:
    """An evaluate instruction; ``extras`` as in :class:`FitIns`."""

    parameters: Parameters
    config: Config
    extras: RecordDict = field(default_factory=RecordDict)


@dataclass
class EvaluateRes:
    """An evaluate reply; ``extras`` as in :class:`FitRes` (not validated by the server)."""

    status: Status
    loss: float
    num_examples: int
    metrics: dict[str, Scalar] = field(default_factory=dict)
    extras: RecordDict = field(default_factory=RecordDict)


def layers_record(indices: Sequence[int]) -> dict[str, Scalar]:
    """The ``"layers"`` config record of a reply carrying the model arrays ``indices``.

    Example: a client that keeps layer 1 at home replies with arrays 0 and 2 and
    ``extras=RecordDict(config_records={LAYERS_RECORD: layers_record([0, 2])})``.
    """
    out = [_layer_index(i, j) for j, i in enumerate(indices)]
    _check_increasing(out)
    return {str(j): i for j, i in enumerate(out)}


def present_layers(extras: RecordDict, num_arrays: int) -> list[int] | None:
    """The global indices of a reply's ``num_arrays`` model arrays, from its ``"layers"``
    record; ``None`` when there is none. A malformed record raises :class:`SerdeError`."""
    record = extras.config_records.get(LAYERS_RECORD)
    if record is None:
        return None
    expected = [str(j) for j in range(num_arrays)]
    if list(record) != expected:
        raise SerdeError(
            f"the {LAYERS_RECORD!r} record must have one entry per model array, named "
            f"{expected[:4]}{'...' if num_arrays > 4 else ''} in order; got keys {list(record)[:8]}"
        )
    out = [_layer_index(v, j) for j, v in enumerate(record.values())]
    _check_increasing(out)
    return out


def _layer_index(value: object, position: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise SerdeError(f"layer index {position} must be an int >= 0, got {value!r}")
    return int(value)


def _check_increasing(indices: Sequence[int]) -> None:
    if any(b <= a for a, b in itertools.pairwise(indices)):
        raise SerdeError(f"layer indices must be strictly increasing, got {list(indices)}")


# -- Flower 1.x names kept for code written against them ---------------------------------

#: A client's properties (``get_properties``): names to scalars.
Properties: TypeAlias = dict[str, Scalar]


@dataclass
class ReconnectIns:
    """Flower's request that a client disconnect and come back after ``seconds``."""

    seconds: int | None = None


@dataclass
class DisconnectRes:
    """Flower's answer to :class:`ReconnectIns`: why the client disconnected."""

    reason: str = ""


class ConfigsRecord(dict[str, Scalar]):
    """Flower's config record: a dict of str to scalars, checked when built."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        super().__init__(check_scalar_mapping(values or {}, "ConfigsRecord"))


class MetricsRecord(dict[str, int | float]):
    """Flower's metrics record: a dict of str to int or float, checked when built."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        checked = check_scalar_mapping(values or {}, "MetricsRecord")
        for key, value in checked.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SerdeError(f"MetricsRecord[{key!r}] must be an int or float, got {value!r}")
        super().__init__(checked)  # type: ignore[arg-type]


class RecordSet(RecordDict):
    """Flower's name for :class:`RecordDict`, built with Flower's keyword names."""

    __slots__ = ()

    def __init__(
        self,
        parameters_records: Mapping[str, Mapping[str, NDArray]] | None = None,
        metrics_records: Mapping[str, Mapping[str, int | float]] | None = None,
        configs_records: Mapping[str, Mapping[str, Scalar]] | None = None,
    ) -> None:
        super().__init__(parameters_records, configs_records, metrics_records)
