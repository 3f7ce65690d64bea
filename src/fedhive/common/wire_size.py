"""Exact encoded lengths of :mod:`fedhive.common.serde` payloads, without encoding them.

Byte accounting measures every message as the wire would carry it, also where nothing is
encoded (in-process transports). Building the JSON headers only to take their length costs
more than the rest of a client-round, so this module adds up the lengths of the pieces the
encoder would write instead: the fixed punctuation of each header, the escaped length of
each string (:func:`json.encoder.encode_basestring_ascii`, the function the encoder uses),
the digits of each number and the padding to the 64-byte data alignment.

The model covers what messages usually hold: plain ``bool``/``int``/``float``/``str``/
``bytes`` scalars and numpy arrays of the allowed dtypes. Anything else (numpy scalars in a
metrics mapping, subclasses, values the encoder refuses) raises :class:`Unsized`, and the
caller measures the real encoding, which is exact by definition. ``tests/test_wire_size.py``
checks the model against the encoder on generated payloads.
"""

from __future__ import annotations

from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

import numpy as np

from fedhive.common import serde
from fedhive.common.records import RecordDict

__all__ = [
    "Unsized",
    "framed",
    "record_dict_layout",
    "record_dict_size",
    "scalar_list_size",
    "scalars_size",
]


class Unsized(Exception):
    """The payload holds something the length model does not cover: encode it instead."""


_PREFIX = serde._PREFIX.size
_ALIGN = serde._ALIGN
_DTYPES = serde._DTYPES
# A scalar triple is ``[key,"tag",value]``: brackets, two commas and the quoted tag.
_TRIPLE = {tag: len(f'[,"{tag}",]') for tag in ("bool", "int", "float", "str", "bytes")}
_SCALARS_HEADER = len('{"values":}')
_ENTRY = len('{"name":,"dtype":,"shape":,"offset":,"nbytes":}')
_RECORDS_HEADER = len(
    '{"codec":,"arrays":,"records":{"array_records":,"config_records":,"metric_records":}}'
)
_NAMED = len("[,]")  # a ``[name, value]`` pair
# dtype -> the length of its quoted name, or None where the encoder refuses it. Reading a
# dtype's name and layout costs microseconds each time; a dtype hashes fast.
_DTYPE_NAME: dict[np.dtype[Any], int | None] = {}


def _dtype_name(dtype: np.dtype[Any]) -> int | None:
    if dtype.fields is not None or dtype.subdtype is not None or dtype.name not in _DTYPES:
        return None
    return len(_quote(dtype.name))


def _list(lengths: int, count: int) -> int:
    """Length of a JSON list of ``count`` items whose lengths add up to ``lengths``."""
    return 2 + lengths + max(count - 1, 0)


def scalar_list_size(values: Any) -> int:
    """The JSON length of a list of scalar triples (a config record)."""
    return _scalar_list(values)


# Per scalar triple, besides its quoted key and its value's characters: the fixed
# punctuation, the quoted tag, and the value's quotes where it is written as a string.
_BOOL = _TRIPLE["bool"]
_INT = _TRIPLE["int"] + 2  # a quoted hex string
_FLOAT = _TRIPLE["float"] + 2
_STR = _TRIPLE["str"]  # the value's quotes come with its escaped length
_BYTES = _TRIPLE["bytes"] + 2  # quoted base64


def _scalar_list(values: Any, numbers_only: bool = False) -> int:
    """The JSON length of a config or metric record's scalar triples (one loop, no call
    per scalar: a record can hold thousands)."""
    if type(values) is not dict:
        raise Unsized
    total = 0
    quote = _quote
    for key, value in values.items():
        if type(key) is not str:
            raise Unsized
        kind = type(value)
        if kind is int:
            total += _INT + len(hex(value))
        elif kind is float:
            total += _FLOAT + len(repr(value))
        elif numbers_only:
            raise Unsized
        elif kind is bytes:
            total += _BYTES + 4 * ((len(value) + 2) // 3)
        elif kind is str:
            total += _STR + len(quote(value))
        elif kind is bool:
            total += _BOOL + (4 if value else 5)
        else:
            raise Unsized
        total += len(quote(key))
    return _list(total, len(values))


def scalars_size(values: Mapping[str, Any]) -> int:
    """``len(serde.encode_scalars(values))``; raises :class:`Unsized` where not modelled."""
    return _PREFIX + _SCALARS_HEADER + _scalar_list(values)


def _named_list(group: dict[str, Any], numbers_only: bool) -> int:
    total = 0
    for name, record in group.items():
        if type(name) is not str:
            raise Unsized
        total += _NAMED + len(_quote(name)) + _scalar_list(record, numbers_only)
    return _list(total, len(group))


def record_dict_size(rd: RecordDict) -> int:
    """``sum(map(len, serde.encode_record_pieces(rd)))``; raises :class:`Unsized` where
    not modelled."""
    header, end = record_dict_layout(rd)
    return framed(header) + end


def framed(header: int) -> int:
    """Bytes of a record payload's prefix and ``header``-byte JSON header, padded so that
    the data section starts 64-byte aligned."""
    return -(-(_PREFIX + header) // _ALIGN) * _ALIGN


def record_dict_layout(rd: RecordDict) -> tuple[int, int]:
    """The unpadded JSON header length of ``rd``'s record payload and the length of its
    data section; raises :class:`Unsized` where not modelled."""
    entries = 0
    count = 0
    end = 0  # bytes of the data section so far
    layout = 0
    for i, (rec_name, record) in enumerate(rd.array_records.items()):
        if type(rec_name) is not str or type(record) is not dict:
            raise Unsized
        layout += _NAMED + len(_quote(rec_name)) + len(str(len(record)))
        for key, array in record.items():
            if type(key) is not str or type(array) is not np.ndarray:
                raise Unsized
            dtype = array.dtype
            name_len = _DTYPE_NAME.get(dtype, 0)
            if name_len == 0:
                name_len = _DTYPE_NAME[dtype] = _dtype_name(dtype)
            if name_len is None:
                raise Unsized
            nbytes = array.nbytes
            offset = -(-end // _ALIGN) * _ALIGN if nbytes else 0
            shape = array.shape
            entries += (
                _ENTRY
                + len(_quote(f"{i}/{key}"))
                + name_len
                + _list(sum(len(str(d)) for d in shape), len(shape))
                + len(str(offset))
                + len(str(nbytes))
            )
            count += 1
            if nbytes:
                end = offset + nbytes
    header = (
        _RECORDS_HEADER
        + 1  # codec 0: record payloads are never codec-tagged
        + _list(entries, count)
        + _list(layout, len(rd.array_records))
        + _named_list(rd.config_records, numbers_only=False)
        + _named_list(rd.metric_records, numbers_only=True)
    )
    return header, end
