"""What a reply can need: the bounds a serving transport holds each upload to.

A reply to a task carries at most the model once per *record* (the model arrays, each
extra the strategy declares: SCAFFOLD's control-variate delta, an encoded payload, a
secure aggregation ring vector), each element at most 8 bytes wide whatever the model's
dtype (a client may answer a float32 model in float64; SecAgg+ sends uint64), plus a
margin for metrics, configs, ids and error text. Its header lists at most one entry per
model array per record, plus a few named extras. :func:`reply_bound` computes that from
the model; the gRPC server refuses an upload that declares more bytes before storing
any of it, and a header that is longer or lists more arrays before parsing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhive.common.serde import HeaderLimits

__all__ = ["DEFAULT_MARGIN_BYTES", "MAX_NUM_EXAMPLES", "ReplyBound", "reply_bound"]

#: The largest ``num_examples`` a reply may carry: beyond 2**53 a count is no longer exact
#: as a float weight, and no data set is that large.
MAX_NUM_EXAMPLES = 1 << 53
#: Room beside the model arrays in a reply (metrics, configs, ids, an error's text).
DEFAULT_MARGIN_BYTES = 1 << 20
_WIDEST = 8  # bytes of the widest real dtype
_ENTRY_BYTES = 256  # header bytes one array entry may take (its name, dtype, shape, ...)
_SPARE_ARRAYS = 64  # arrays of small named extras beside the model-sized records


@dataclass(frozen=True)
class ReplyBound:
    """The most one reply may hold: ``max_bytes`` in all and the ``header`` limits."""

    max_bytes: int
    header: HeaderLimits

    def widest(self, other: ReplyBound | None) -> ReplyBound:
        if other is None:
            return self
        return ReplyBound(
            max(self.max_bytes, other.max_bytes),
            HeaderLimits(
                max(self.header.max_header_bytes, other.header.max_header_bytes),
                max(self.header.max_arrays, other.header.max_arrays),
            ),
        )


def reply_bound(
    arrays: Sequence[Any], records: int = 2, margin: int = DEFAULT_MARGIN_BYTES
) -> ReplyBound:
    """The bound of a reply to a task whose model is ``arrays``, carrying at most
    ``records`` model-sized records (the model and the strategy's declared extras)."""
    per_record = 0
    for array in arrays:
        dtype = np.asarray(array).dtype if not hasattr(array, "dtype") else array.dtype
        per_record += int(np.size(array)) * max(_WIDEST, dtype.itemsize) + 64
    max_arrays = records * len(arrays) + _SPARE_ARRAYS
    header = margin + _ENTRY_BYTES * max_arrays
    return ReplyBound(
        max_bytes=margin + 2 * header + records * per_record,
        header=HeaderLimits(max_header_bytes=header, max_arrays=max_arrays),
    )
