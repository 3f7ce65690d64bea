"""What a SecAgg+ client checks before it trusts the server's plan and its peers' keys.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead")
is secure against a lying server only if every honest client enforces the threshold and
the identities itself; these checks are the client's (docs/secure_aggregation.md, the
threshold bound and the threat model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedhive.common.errors import ConfigError, ProtocolError
from fedhive.common.records import Scalar
from fedhive.secagg import primitives as p
from fedhive.secagg.config import SecAggConfig
from fedhive.secagg.messages import advert_bytes
from fedhive.secagg.messages import field_bytes as _bytes
from fedhive.secagg.messages import field_float as _float
from fedhive.secagg.messages import field_int as _int

__all__ = ["check_peer", "check_plan"]


def check_plan(
    params: Mapping[str, Scalar], sid: int, threshold: int, corrupt_fraction: float
) -> int:
    """The advertise stage's checks of the server's plan: the client's share index is in
    1..n and ``threshold`` is at least the safe bound for the degree the parameters imply
    (with the corrupt fraction the larger of the server's and the client's own, so a
    server cannot talk it down). Returns that degree; raises :class:`ProtocolError`."""
    n = _int(params, "n")
    option = _int(params, "degree")  # 0: from n, -1: complete
    degree: int | str | None = {0: None, -1: "complete"}.get(option, option)
    try:
        config = SecAggConfig(
            degree=degree,
            max_clients=max(n, 2),
            corrupt_fraction=max(_float(params, "corrupt_fraction"), corrupt_fraction),
            dropout_fraction=_float(params, "dropout_fraction"),
            failure_probability=_float(params, "failure_probability"),
            max_weight=1,
            bits=1,
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise ProtocolError(f"invalid secure aggregation parameters: {exc}") from None
    if n < 2 or sid > n:
        raise ProtocolError(f"share index check: id {sid} is not in 1..{n}")
    k = config.implied_degree(n)
    safe = config.safe_threshold(k, n)
    if not safe <= threshold <= k:
        raise ProtocolError(
            f"threshold check: the server sent threshold {threshold}, but with {k} "
            f"neighbours ({n} clients, corrupt fraction {config.corrupt_fraction}) it "
            f"must be at least the safe bound {safe} and at most {k}; refusing the round"
        )
    return k


def check_peer(
    trusted: Mapping[str, bytes],
    meta: Any,
    sid: int,
    node: str,
    advert: Mapping[str, Scalar],
    commit: bytes = b"",
) -> tuple[bytes, bytes, bytes]:
    """The peer's (share key, mask key, identity key).

    With enrolled identities, the peer must be enrolled and its keys signed by its
    identity key. Without them, the identity key comes from the server as well, so a
    signature could not show anything the server did not choose; the server checks
    it instead, and the client skips the cost.
    """
    c_pk, s_pk = _bytes(advert, "c_pk", 32), _bytes(advert, "s_pk", 32)
    id_pk = _bytes(advert, "id_pk", 32)
    if advert.get("commit", b"") != commit:
        raise ProtocolError(
            f"graph check: the commitment of neighbour {sid} in its keys is not the one "
            "the server listed in the graph stage; refusing the round"
        )
    if not trusted:
        return c_pk, s_pk, id_pk
    pinned = trusted.get(node)
    if pinned is None or pinned != id_pk:
        raise ProtocolError(f"client {node!r} presented an identity key that is not enrolled")
    signed = advert_bytes(meta.run_id, meta.server_round, sid, node, c_pk, s_pk, commit)
    if not p.verify(id_pk, _bytes(advert, "sig"), signed):
        raise ProtocolError(f"the keys of client {node!r} carry no valid signature")
    return c_pk, s_pk, id_pk
