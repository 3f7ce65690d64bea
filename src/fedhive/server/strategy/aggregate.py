"""Streaming aggregation of model updates.

:class:`WeightedMean` folds one update at a time into a float64 accumulator, so a round
costs O(model) memory whatever the number of clients: the accumulator (8 bytes per
parameter) plus a small scratch buffer. Each product ``weight * value`` is formed in
float64, where it is exact for float32 values and weights below 2**29, and the mean is
rounded to the model's dtype once, at the end. Layers are folded in slices of
:data:`FOLD_ELEMENTS` so the scratch buffer stays in cache; the result is the same, bit
for bit, as folding whole layers.

``accumulator="model"`` halves the accumulator of float32 layers (other layers keep the
float64 one): it holds the running weighted mean ``m`` of each update's difference from
the global model, in float32, and folds update ``k`` (weight ``w``, total so far ``W``)
as ``m += (w / W) * ((update - model) - m)`` in float32 arithmetic (four roundings,
about twice as fast as float64 arithmetic on float32 data); the mean is global model +
``m``, rounded once. With ``n`` updates whose largest difference from the global model
is ``D``, each fold adds at most ``(5 * w / W + 1) * 2**-24 * D`` to the error and an
earlier error only shrinks (it is scaled by ``1 - w / W``), so the result differs from
the exact weighted mean by at most its final rounding (half an ulp, as with the float64
accumulator) plus ``6 * n * 2**-24 * D``. Identical updates give the global model back
exactly, and updates that are small next to the model lose nearly nothing; large updates
whose mean nearly cancels lose the most, relative to that mean.

Dtype rules for replies, checked against the current global model:

- floating layers: any float reply is accepted and the mean is cast back to the global
  layer's dtype (a float64 reply to a float32 model yields float32);
- integer and bool layers: averaged as real numbers, so the result is float64, as Flower's
  ``aggregate`` does (``num_batches_tracked`` becomes a float64 mean);
- complex, object, string or other non-numeric replies are refused, as are NaN/Inf
  values, a wrong number of arrays or a wrong shape.

A refused update raises :class:`~fedhive.common.errors.InvalidUpdate` before anything is
folded, so the aggregate never holds part of a bad update. :func:`check_fit_reply` checks
a whole fit reply (model arrays and named extras) against the layout its strategy declared
(:class:`~fedhive.server.strategy.traits.UpdateLayout`); the engine calls it on every
reply before the strategy's aggregator sees it.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhive.common.errors import ConfigError, InvalidUpdate, SerdeError
from fedhive.common.records import (
    LAYERS_RECORD,
    FitRes,
    NDArray,
    NDArrays,
    RecordDict,
    present_layers,
)
from fedhive.common.spill import DROP_BYTES, page_dropper, read_slices

if TYPE_CHECKING:
    from fedhive.server.strategy.traits import ExtraRecord, UpdateLayout

__all__ = [
    "ACCUMULATORS",
    "FOLD_ELEMENTS",
    "WeightedMean",
    "aggregate",
    "check_accumulator",
    "check_fit_reply",
    "check_update",
    "is_finite",
    "weighted_loss_avg",
]

_NUMERIC_KINDS = frozenset("biuf")
FOLD_ELEMENTS = 1 << 15
ACCUMULATORS = ("float64", "model")
_OWN_PAGES_BYTES = 1 << 20
_SMALL = 1 << 14  # elements


def _finite(array: NDArray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is told apart below
        total = np.add.reduce(array, axis=None)
    if np.isfinite(total):
        return True
    return bool(np.isfinite(array).all())


def is_finite(array: NDArray) -> bool:
    """True when no element is NaN or +-Inf.

    A finite sum proves it (NaN and Inf propagate); only when the sum is not finite, which
    overflow can also cause, is every element checked. An array read from a message
    staged on disk is checked a part at a time, each part's pages dropped once checked
    (:mod:`fedhive.common.spill`).
    """
    if array.dtype.kind != "f" or array.size == 0:
        return True
    if array.size <= _SMALL:  # a small boolean temporary costs less than errstate + sum
        return bool(np.isfinite(array).all())
    if page_dropper(array) is None:
        return _finite(array)
    flat = array.reshape(-1)
    step = max(1, DROP_BYTES // array.itemsize)
    return all(_finite(flat[start:stop]) for start, stop in read_slices(flat, step))


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

    _check_arrays(arrays, reference, refuse)


_Refuse = Callable[[str], InvalidUpdate]


def _check_arrays(
    arrays: Sequence[Any],
    reference: Sequence[NDArray],
    refuse: _Refuse,
    label: Callable[[int], str] = "array {}".format,
) -> None:
    if len(arrays) != len(reference):
        raise refuse(
            f"expected {len(reference)} arrays, got {len(arrays)}"
            + _first_difference(arrays, reference, label)
        )
    for i, (arr, ref) in enumerate(zip(arrays, reference, strict=True)):
        if not isinstance(arr, np.ndarray):
            raise refuse(f"{label(i)} is a {type(arr).__name__}, not a numpy array")
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise refuse(f"{label(i)} has non-numeric dtype {arr.dtype}")
        if arr.shape != ref.shape:
            raise refuse(f"{label(i)} has shape {arr.shape}, expected {ref.shape}")
        if not is_finite(arr):
            raise refuse(f"{label(i)} contains NaN or Inf")


def _first_difference(
    arrays: Sequence[Any], reference: Sequence[NDArray], label: Callable[[int], str]
) -> str:
    """``"; array 2 has shape (3,), expected (4,)"``: where two layouts first differ."""
    for i in range(min(len(arrays), len(reference))):
        shape = getattr(arrays[i], "shape", None)
        if shape != reference[i].shape:
            return f"; {label(i)} has shape {shape}, expected {reference[i].shape}"
    if len(arrays) < len(reference):
        return f"; {label(len(arrays))} (shape {reference[len(arrays)].shape}) is missing"
    extra = getattr(arrays[len(reference)], "shape", None)
    return f"; {label(len(reference))} (shape {extra}) is extra"


def check_fit_reply(
    res: FitRes,
    reference: Sequence[NDArray],
    layout: UpdateLayout,
    *,
    client_id: str,
    server_round: int,
    required_mods: Sequence[Callable[..., Any]] = (),
) -> None:
    """Raise :class:`InvalidUpdate` unless the fit reply ``res`` carries the update record
    that ``layout`` declares, ``reference`` being the global model.

    - Model arrays (``res.parameters``), per ``layout.model``: ``"full"``, every array of
      ``reference`` (:func:`check_update`); ``"partial"``, the arrays that the config
      record ``"layers"`` of ``res.extras`` names
      (:func:`~fedhive.common.records.present_layers`), each like the model array at its
      index; ``"none"``, no arrays at all.
    - Each declared :class:`~fedhive.server.strategy.traits.ExtraRecord`: present in its
      group when required; a ``like_model`` array record holds arrays ``"0"``, ``"1"``,
      ... with the model's count and shapes, numeric and finite.
    - Any other extra record is refused, by name (``"layers"`` is part of a partial layout).

    ``required_mods`` (the strategy's ``traits.required_mods``) are named when a required
    extra is missing: a client mod usually sets it. Cost: one pass over every array checked.
    """

    def refuse(reason: str) -> InvalidUpdate:
        return InvalidUpdate(client_id, server_round, "fit", reason)

    arrays = res.parameters.arrays
    extras = res.extras
    if not isinstance(extras, RecordDict):
        raise refuse(f"FitRes.extras must be a RecordDict, got {type(extras).__name__}")
    if layout.model == "full":
        _check_arrays(arrays, reference, refuse)
    elif layout.model == "partial":
        _check_partial(arrays, extras, reference, refuse)
    elif arrays:
        raise refuse(
            f"expected no model arrays (this strategy's updates travel in FitRes.extras), "
            f"got {len(arrays)}"
        )
    if extras.is_empty() and not layout.extras:
        return
    for extra in layout.extras:
        _check_extra(extra, extras, reference, refuse, required_mods)
    _refuse_undeclared(extras, layout, refuse)


def _check_partial(
    arrays: Sequence[Any], extras: RecordDict, reference: Sequence[NDArray], refuse: _Refuse
) -> None:
    try:
        indices = present_layers(extras, len(arrays))
    except SerdeError as exc:
        raise refuse(f"partial update: {exc}") from None
    if indices is None:
        raise refuse(
            f"a partial update must name its model arrays in the config record "
            f"{LAYERS_RECORD!r} of FitRes.extras (see fedhive.common.records.layers_record); "
            f"the reply has {len(arrays)} arrays and no such record"
        )
    if indices and indices[-1] >= len(reference):
        raise refuse(
            f"partial update names model array {indices[-1]}, but the model has "
            f"{len(reference)} arrays"
        )
    _check_arrays(
        arrays,
        [reference[i] for i in indices],
        refuse,
        lambda j: f"array {j} (model array {indices[j]})",
    )


_GROUPS = {"arrays": "array_records", "config": "config_records", "metrics": "metric_records"}


def _check_extra(
    extra: ExtraRecord,
    extras: RecordDict,
    reference: Sequence[NDArray],
    refuse: _Refuse,
    required_mods: Sequence[Callable[..., Any]],
) -> None:
    group = _GROUPS[extra.kind]
    record = getattr(extras, group).get(extra.name)
    if record is None:
        if not extra.required:
            return
        mods = ", ".join(f"{m.__module__}.{m.__qualname__}" for m in required_mods)
        hint = (
            f"does the client run {mods}?"
            if mods
            else f"the client must set FitRes.extras.{group}[{extra.name!r}]"
        )
        raise refuse(
            f"the reply has no extra record {extra.name!r} ({group}), which this strategy "
            f"requires; {hint}"
        )
    if extra.kind != "arrays":
        return
    what = f"extra record {extra.name!r}"
    if not extra.like_model:
        for key, arr in record.items():
            if not isinstance(arr, np.ndarray):
                raise refuse(f"{what}: {key!r} is a {type(arr).__name__}, not a numpy array")
        return
    expected = [str(i) for i in range(len(reference))]
    if len(record) != len(reference):
        raise refuse(
            f"{what} must hold one array per model array ({len(reference)}), got {len(record)}"
        )
    if list(record) != expected:
        raise refuse(f"{what} must name its arrays 0, 1, ... in order, got {list(record)[:8]}")
    _check_arrays(list(record.values()), reference, refuse, f"{what}: array {{}}".format)


def _refuse_undeclared(extras: RecordDict, layout: UpdateLayout, refuse: _Refuse) -> None:
    declared = {(_GROUPS[e.kind], e.name) for e in layout.extras}
    if layout.model == "partial":
        declared.add(("config_records", LAYERS_RECORD))
    found = [
        (group, name)
        for group in ("array_records", "config_records", "metric_records")
        for name in getattr(extras, group)
        if (group, name) not in declared
    ]
    if not found:
        return
    names = ", ".join(f"{group}[{name!r}]" for group, name in found)
    allowed = ", ".join(f"{group}[{name!r}]" for group, name in sorted(declared)) or "none"
    hint = (
        f"; {LAYERS_RECORD!r} marks a partial model, but this strategy expects "
        f"layout model={layout.model!r}"
        if ("config_records", LAYERS_RECORD) in found
        else ""
    )
    raise refuse(
        f"the reply carries extra records this strategy did not declare: {names} (declared: "
        f"{allowed}){hint}; remove them, or declare them in the strategy's traits.layout"
    )


def check_accumulator(accumulator: str) -> str:
    """``accumulator`` if it is one of :data:`ACCUMULATORS`, else :class:`ConfigError`."""
    if accumulator not in ACCUMULATORS:
        raise ConfigError(f"accumulator must be one of {ACCUMULATORS}, not {accumulator!r}")
    return accumulator


def _fresh(shape: tuple[int, ...], dtype: np.dtype[Any]) -> NDArray:
    """A new array of zeros; a large one gets a memory mapping of its own.

    An accumulator or a mean of a round is freed a round later; had it come from the
    allocator's heap, that memory would often stay with the process (a later, smaller
    allocation keeps the heap from shrinking). Its own mapping goes back to the system.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _OWN_PAGES_BYTES:
        return np.zeros(shape, dtype)
    return np.frombuffer(_mapping(nbytes), dtype=dtype).reshape(shape)


def _mapping(nbytes: int) -> mmap.mmap:
    """Anonymous memory, its pages made present at once where the system can.

    Populating the whole mapping in one call costs about half of faulting its pages in
    one by one as they are first written.
    """
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate and hasattr(mmap, "MAP_ANONYMOUS"):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
        return mmap.mmap(-1, nbytes, flags=flags)
    return mmap.mmap(-1, nbytes)


def _fold(
    acc: NDArray, values: NDArray, weight: float, scratch: NDArray, first: bool = False
) -> None:
    """``acc += weight * values`` in float64, one cache-sized slice at a time (the pages
    of ``values`` staged on disk are dropped as they are read). ``first``: ``acc`` is all
    zeros, so the product is written straight into it (plus 0.0, which turns a -0.0 into
    0.0 as adding it to zero would: the same bits, without reading the zeros)."""
    if first:
        for start, stop in read_slices(values, FOLD_ELEMENTS):
            part = acc[start:stop]
            np.multiply(values[start:stop], weight, out=part, dtype=np.float64)
            np.add(part, 0.0, out=part)
        return
    if values.size <= FOLD_ELEMENTS:  # one slice: too few pages to be worth dropping
        product = scratch[: values.size]
        np.multiply(values, weight, out=product, dtype=np.float64)
        np.add(acc, product, out=acc)
        return
    for start, stop in read_slices(values, FOLD_ELEMENTS):
        product = scratch[: stop - start]
        np.multiply(values[start:stop], weight, out=product, dtype=np.float64)
        np.add(acc[start:stop], product, out=acc[start:stop])


def _fold_difference(
    mean: NDArray, values: NDArray, model: NDArray, share: float, scratch: NDArray
) -> None:
    """``mean += share * ((values - model) - mean)``, in the float32 of ``mean``."""
    factor = mean.dtype.type(share)
    for start, stop in read_slices(values, FOLD_ELEMENTS):
        part = mean[start:stop]
        d = scratch[: stop - start]
        np.subtract(values[start:stop], model[start:stop], out=d, casting="same_kind")
        np.subtract(d, part, out=d)
        np.multiply(d, factor, out=d)
        np.add(part, d, out=part)


def _add_model(mean: NDArray, model: NDArray) -> NDArray:
    """``model + mean`` in float64, rounded once, written over ``mean``."""
    flat_mean, flat_model = mean.reshape(-1), model.reshape(-1)
    for start in range(0, mean.size, FOLD_ELEMENTS):
        part = slice(start, start + FOLD_ELEMENTS)
        np.add(
            flat_model[part],
            flat_mean[part],
            out=flat_mean[part],
            dtype=np.float64,
            casting="same_kind",
        )
    return mean


def _mean(acc: NDArray, total: float, dtype: np.dtype[Any]) -> NDArray:
    """``acc / total`` rounded once to ``dtype``; divides in place when it is float64.

    A narrower mean of an accumulator with a mapping of its own is written over the front
    of that mapping, slice by slice (from the second slice on, slice ``[s, e)`` of the
    mean ends at byte 4 e <= 8 s, before the unread part of the accumulator; numpy
    buffers the first, whose bytes overlap), and the rest of the mapping is given back:
    no new memory for the mean, and no zeros written first.
    """
    if dtype == np.float64:
        return np.divide(acc, total, out=acc)
    flat_acc = acc.reshape(-1)
    nbytes = acc.size * dtype.itemsize
    mapping = _own_mapping(acc) if dtype.itemsize <= acc.itemsize else None
    if mapping is None:
        flat_out = _fresh((acc.size,), dtype)
    else:
        flat_out = flat_acc.view(np.uint8)[:nbytes].view(dtype)
    for start in range(0, acc.size, FOLD_ELEMENTS):
        stop = start + FOLD_ELEMENTS
        np.divide(flat_acc[start:stop], total, out=flat_out[start:stop], casting="same_kind")
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    keep = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    if mapping is not None and dontneed is not None and keep < len(mapping):
        mapping.madvise(dontneed, keep, len(mapping) - keep)
    return flat_out.reshape(acc.shape)


def _own_mapping(array: NDArray) -> mmap.mmap | None:
    """The anonymous mapping ``array`` spans whole (from :func:`_fresh`), if any."""
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer keeps the buffer through a memoryview
        base = base.obj
    if isinstance(base, mmap.mmap) and len(base) == array.nbytes:
        return base
    return None


class WeightedMean:
    """Running weighted mean of lists of arrays, one list at a time.

    ``reference`` is the global model: it gives the layout (count, shapes, dtypes) that
    every update must match and, with ``accumulator="model"``, the values the float32
    layers' differences are taken from (see the module doc).
    """

    def __init__(self, reference: Sequence[NDArray], *, accumulator: str = "float64") -> None:
        check_accumulator(accumulator)
        self.reference = list(reference)
        self.accumulator = accumulator
        self._compact = [accumulator == "model" and r.dtype == np.float32 for r in reference]
        self._acc = [
            _fresh(r.shape, r.dtype if compact else np.dtype(np.float64))
            for r, compact in zip(self.reference, self._compact, strict=True)
        ]
        largest = min(max((r.size for r in self.reference), default=0), FOLD_ELEMENTS)
        self._scratch = np.empty(largest, dtype=np.float64)
        self._scratch32 = np.empty(largest if any(self._compact) else 0, dtype=np.float32)
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
        if len(self._acc) != len(self.reference):
            raise RuntimeError("WeightedMean.add after result()")
        if check:
            check_update(arrays, self.reference, client_id=client_id, server_round=server_round)
        elif [np.shape(a) for a in arrays] != [r.shape for r in self.reference]:
            raise InvalidUpdate(client_id, server_round, "fit", "arrays do not match the model")
        if not math.isfinite(weight) or weight < 0:
            raise InvalidUpdate(client_id, server_round, "fit", f"invalid weight {weight!r}")
        total = self.total_weight + weight
        for acc, arr, ref, compact in zip(
            self._acc, arrays, self.reference, self._compact, strict=True
        ):
            values = np.asarray(arr).reshape(-1)
            if not compact:
                _fold(acc.reshape(-1), values, weight, self._scratch, first=self.count == 0)
            elif weight > 0:
                _fold_difference(
                    acc.reshape(-1), values, ref.reshape(-1), weight / total, self._scratch32
                )
        self.total_weight = total
        self.count += 1

    def result(self) -> NDArrays | None:
        """The weighted mean, in the model's dtypes; ``None`` when the total weight is 0.

        Ends the aggregation: each layer's accumulator is turned into its mean in place
        where the dtypes allow (float64, and float32 with ``accumulator="model"``), else
        into a new array before it is dropped, so the mean never coexists with the whole
        accumulator.
        """
        if self.total_weight <= 0:
            return None
        if len(self._acc) != len(self.reference):
            raise RuntimeError("WeightedMean.result() was already called")
        out = []
        for ref, compact in zip(self.reference, self._compact, strict=True):
            acc = self._acc.pop(0)
            if compact:
                out.append(_add_model(acc, ref))
            else:
                dtype = ref.dtype if ref.dtype.kind == "f" else acc.dtype
                out.append(_mean(acc, self.total_weight, dtype))
            del acc
        return out


def aggregate(results: Sequence[tuple[Sequence[NDArray], float]]) -> NDArrays:
    """The weighted mean of ``(arrays, num_examples)`` pairs (Flower's ``aggregate``).

    Computed as :class:`WeightedMean` computes FedAvg's mean (float64, then back to each
    float layer's dtype of the first model; integer layers give float64). An empty
    ``results`` has no mean: :class:`ValueError`.
    """
    if not results:
        raise ValueError("aggregate() needs at least one (arrays, num_examples) pair")
    mean = WeightedMean([np.asarray(a) for a in results[0][0]])
    for index, (arrays, num_examples) in enumerate(results):
        mean.add(
            [np.asarray(a) for a in arrays], num_examples, client_id=str(index), server_round=0
        )
    out = mean.result()
    if out is None:
        raise ValueError("aggregate() needs a positive total number of examples")
    return out


def weighted_loss_avg(results: Sequence[tuple[int, float]]) -> float:
    """Loss averaged with weights ``num_examples`` (NaN when they sum to 0)."""
    total = sum(n for n, _ in results)
    if total == 0:
        return float("nan")
    return sum(n * loss for n, loss in results) / total
