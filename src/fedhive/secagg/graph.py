"""The neighbour graph of a SecAgg+ round, derived from randomness every client adds.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead")
bound the colluders among a client's k neighbours by assuming the graph is random; a
server that draws it itself can put a target between its colluders. So the graph comes
from a coin flip in which every client takes part (commit, then reveal; Blum 1981,
"Coin Flipping by Telephone"):

1. With its keys (``secagg.advertise``) each client i sends a commitment
   ``H(run, round, i, r_i)`` to a fresh 32-byte random r_i, covered by its signature.
2. ``secagg.graph``: the server sends every client the list of commitments; each client
   checks that its own is in it, keeps the list, and reveals r_i.
3. With its neighbours' keys (``secagg.share_keys``) the server sends every reveal; each
   client checks each against the list it kept (a reveal missing, or not matching, or a
   neighbour's commitment that differs from the one in its signed keys: refused), and
   derives the graph: a Harary graph over the clients in the order of
   ``H(seed, i)``, where ``seed = H(run, round, n, every (i, r_i) by id)``.

Why it holds: a client fixes the list before it reveals, and its own r_i is uniform and
hidden by its commitment until then; every other value in the seed is bound by a
commitment in that list. So whatever the server and its colluders chose, the seed, and
with it the order of the clients, is uniform: each client's neighbours are a uniform
k-subset of the others, the assumption behind the threshold bound. What is left to the
server is to abort after seeing the graph (a new round draws a new one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from fedhive.common.errors import ProtocolError
from fedhive.common.records import Scalar
from fedhive.secagg.messages import field_bytes, field_int

__all__ = [
    "VALUE_BYTES",
    "check_announced",
    "check_commitments",
    "check_reveals",
    "client_neighbours",
    "commitment",
    "commitment_of",
    "derived_graph",
    "derived_neighbours",
    "graph_order",
    "graph_seed",
    "harary_graph",
    "harary_neighbours",
]

VALUE_BYTES = 32  # r_i, and each commitment (SHA-256)
_ID = np.dtype("<i8")


def commitment(run: int, rnd: int, sid: int, value: bytes) -> bytes:
    """``H(run, round, sid, value)``: binds the value to one client of one round."""
    return hashlib.sha256(b"fedhive-secagg-commit|%d|%d|%d|" % (run, rnd, sid) + value).digest()


def graph_seed(run: int, rnd: int, n: int, sids: bytes, reveals: bytes) -> bytes:
    """The seed of the round's graph: a hash of every reveal, in the order of the ids."""
    digest = hashlib.sha256(b"fedhive-secagg-graph|%d|%d|%d|" % (run, rnd, n))
    digest.update(sids)
    digest.update(reveals)
    return digest.digest()


def graph_order(n: int, seed: bytes) -> list[int]:
    """The clients 1..n in the order of ``H(seed, id)``: a uniform permutation."""
    return sorted(
        range(1, n + 1), key=lambda sid: hashlib.sha256(seed + sid.to_bytes(8, "little")).digest()
    )


def harary_graph(order: list[int], degree: int) -> dict[int, list[int]]:
    """The k-regular Harary graph over a cycle in ``order``: each client is joined to the
    k/2 clients on either side of it (for odd k and even n, also to the one opposite).
    ``degree >= n - 1`` is the complete graph; an odd k with odd n is raised to k + 1."""
    return {sid: harary_neighbours(order, pos, degree) for pos, sid in enumerate(order)}


def harary_neighbours(order: list[int], pos: int, degree: int) -> list[int]:
    """The neighbours of ``order[pos]`` in :func:`harary_graph`, without building it."""
    n = len(order)
    if degree >= n - 1:
        return sorted(order[:pos] + order[pos + 1 :])
    if degree % 2 and n % 2:
        degree += 1
    out = {order[(pos + step) % n] for step in range(1, degree // 2 + 1)}
    out.update(order[(pos - step) % n] for step in range(1, degree // 2 + 1))
    if degree % 2:
        out.add(order[(pos + n // 2) % n])
    return sorted(out)


def derived_graph(n: int, degree: int, seed: bytes) -> dict[int, list[int]]:
    """Every client's neighbours (what the server computes)."""
    return harary_graph(graph_order(n, seed), degree)


def derived_neighbours(n: int, degree: int, seed: bytes, sid: int) -> list[int]:
    """One client's neighbours (what that client computes: O(n) hashes)."""
    order = graph_order(n, seed)
    return harary_neighbours(order, order.index(sid), degree)


def check_commitments(sids: bytes, commits: bytes, n: int, me: int, mine: bytes) -> None:
    """The list a client receives in the graph stage: ids ascending in 1..n, one
    commitment each, and this client's own commitment, unchanged, under its id."""
    ids = _ids(sids)
    if len(commits) != VALUE_BYTES * len(ids):
        raise ProtocolError(f"graph check: {len(ids)} ids but {len(commits)} bytes of commitments")
    if ids.size and (ids[0] < 1 or ids[-1] > n or np.any(np.diff(ids) <= 0)):
        raise ProtocolError(f"graph check: the committed ids must ascend within 1..{n}")
    if commitment_of(sids, commits, me) != mine:
        raise ProtocolError(
            "graph check: the list of commitments leaves out or changes this client's own"
        )


def check_reveals(run: int, rnd: int, sids: bytes, commits: bytes, reveals: bytes) -> None:
    """Every committed client's reveal, in the order of the list, matches its commitment."""
    ids = _ids(sids).tolist()
    if len(reveals) != VALUE_BYTES * len(ids):
        raise ProtocolError(
            f"graph check: {len(reveals) // VALUE_BYTES} reveals for {len(ids)} commitments: "
            "the server dropped or added a value between stages; refusing the round"
        )
    for at, sid in enumerate(ids):
        value = reveals[at * VALUE_BYTES : (at + 1) * VALUE_BYTES]
        if commitment(run, rnd, sid, value) != commits[at * VALUE_BYTES : (at + 1) * VALUE_BYTES]:
            raise ProtocolError(
                f"graph check: the value revealed for client {sid} does not match its "
                "commitment; refusing the round"
            )


def check_announced(announced: list[int], derived: list[int], n: int, me: int) -> None:
    """The neighbours the server announced are well formed, and they are the derived ones."""
    if (
        any(j < 1 or j > n for j in announced)
        or me in announced
        or (len(set(announced)) != len(announced))
    ):
        raise ProtocolError(
            f"share index check: neighbour ids must be distinct, in 1..{n} and never this "
            f"client's own ({me}); got {sorted(announced)}"
        )
    if len(announced) != len(derived):
        raise ProtocolError(
            f"degree check: the server announced {len(announced)} neighbours, the config "
            f"implies {len(derived)} with {n} clients; refusing the round"
        )
    if sorted(announced) != derived:
        raise ProtocolError(
            f"graph check: the server announced neighbours {sorted(announced)}, but the graph "
            f"derived from every client's committed randomness gives {derived}; refusing "
            "the round"
        )


def client_neighbours(
    run: int, rnd: int, state: dict[str, Scalar], params: Mapping[str, Scalar]
) -> list[int]:
    """A client's neighbours, from its round ``state`` (the commitments it kept) and the
    share-keys ``params`` (every reveal, the announced neighbours); stored in the state."""
    n, me, k = field_int(state, "n"), field_int(state, "sid"), field_int(state, "k")
    if state.get("complete"):
        derived = [j for j in range(1, n + 1) if j != me]
    else:
        sids, commits = field_bytes(state, "sids"), field_bytes(state, "commits")
        reveals = field_bytes(params, "reveals")
        check_reveals(run, rnd, sids, commits, reveals)
        derived = derived_neighbours(n, k, graph_seed(run, rnd, n, sids, reveals), me)
    announced = np.frombuffer(field_bytes(params, "neighbours"), _ID).tolist()
    check_announced(announced, derived, n, me)
    state["neighbours"] = np.asarray(derived, _ID).tobytes()
    return derived


def commitment_of(sids: bytes, commits: bytes, sid: int) -> bytes | None:
    """The commitment listed for ``sid``, or None."""
    ids = _ids(sids)
    at = int(np.searchsorted(ids, sid))
    if at >= ids.size or ids[at] != sid:
        return None
    return commits[at * VALUE_BYTES : (at + 1) * VALUE_BYTES]


def _ids(sids: bytes) -> np.ndarray:
    if len(sids) % _ID.itemsize:
        raise ProtocolError("graph check: malformed list of committed ids")
    return np.frombuffer(sids, _ID)
