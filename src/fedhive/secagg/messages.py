"""What SecAgg+ messages carry: the stage names, the bytes each party signs or binds
into a key, and checked accessors for the fields of a stage's records (a missing or
malformed field is a :class:`~fedhive.common.errors.ProtocolError` that names it)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedhive.common.errors import ProtocolError
from fedhive.common.message import Message
from fedhive.common.records import RecordDict, Scalar
from fedhive.secagg import primitives as p

__all__ = [
    "MASK_KEY",
    "PARAMS",
    "SHARE_PREFIX",
    "STAGE_ADVERTISE",
    "STAGE_CONSISTENCY",
    "STAGE_GRAPH",
    "STAGE_SHARE",
    "STAGE_UNMASK",
    "advert_bytes",
    "field_bytes",
    "field_float",
    "field_int",
    "pair_seed",
    "params_of",
    "records_of",
    "share_associated",
    "share_key",
    "survivors_bytes",
    "survivors_of",
]

STAGE_ADVERTISE = "secagg.advertise"
STAGE_GRAPH = "secagg.graph"
STAGE_SHARE = "secagg.share_keys"
STAGE_CONSISTENCY = "secagg.consistency"
STAGE_UNMASK = "secagg.unmask"
#: The fit config key that marks a masked-input fit; other ``secagg.`` keys carry shares.
MASK_KEY = "secagg.stage"
SHARE_PREFIX = "secagg.share."
PARAMS = "secagg"


def advert_bytes(
    run: int, rnd: int, sid: int, node: str, c_pk: bytes, s_pk: bytes, commit: bytes = b""
) -> bytes:
    """What a client signs to bind its round keys and graph commitment to its identity."""
    return b"advert|%d|%d|%d|%s|" % (run, rnd, sid, node.encode()) + c_pk + s_pk + commit


def survivors_bytes(run: int, rnd: int, survivors: np.ndarray) -> bytes:
    """What survivors sign in the consistency check."""
    return b"survivors|%d|%d|" % (run, rnd) + np.sort(survivors).astype("<i8").tobytes()


def share_associated(run: int, rnd: int, sender: int, receiver: int) -> bytes:
    return b"share|%d|%d|%d|%d" % (run, rnd, sender, receiver)


def pair_seed(secret: bytes | p.KeyPair, peer_public: bytes, run: int, rnd: int) -> bytes:
    return p.agree(secret, peer_public, b"mask|%d|%d" % (run, rnd))


def share_key(secret: bytes | p.KeyPair, peer_public: bytes, run: int, rnd: int) -> bytes:
    return p.agree(secret, peer_public, b"share|%d|%d" % (run, rnd))


def field_int(params: Mapping[str, Scalar], key: str) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"secure aggregation parameter {key!r} missing or not an int")
    return value


def field_float(params: Mapping[str, Scalar], key: str) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, float):
        raise ProtocolError(f"secure aggregation parameter {key!r} missing or not a float")
    return value


def field_bytes(params: Mapping[str, Scalar], key: str, size: int | None = None) -> bytes:
    value = params.get(key)
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise ProtocolError(f"secure aggregation field {key!r} missing or malformed")
    return value


def params_of(message: Message) -> dict[str, Scalar]:
    content = records_of(message)
    params = content.config_records.get(PARAMS)
    if params is None:
        raise ProtocolError(f"{message.metadata.message_type} carries no secure aggregation record")
    return dict(params)


def records_of(message: Message) -> RecordDict:
    if not isinstance(message.content, RecordDict):
        raise ProtocolError(
            f"{message.metadata.message_type} content must be a RecordDict, got "
            f"{type(message.content).__name__}"
        )
    return message.content


def survivors_of(message: Message, name: str) -> np.ndarray:
    arrays = records_of(message).array_records.get(PARAMS, {})
    value = arrays.get(name)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.ndim != 1:
        raise ProtocolError(f"{message.metadata.message_type}: {name!r} must be a 1-D int array")
    return value.astype(np.int64)
