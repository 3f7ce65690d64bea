"""Which clients exist, and seeded sampling among them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

import numpy as np

from fedhive.common.errors import ConfigError
from fedhive.common.message import derive_seed
from fedhive.common.records import Properties
from fedhive.transport.membership import NodeSet

__all__ = [
    "ClientManager",
    "ClientProxy",
    "Criterion",
    "Excluding",
    "SimpleClientManager",
    "excluding_alone",
    "sample_excluding",
]


@dataclass(frozen=True, slots=True)
class ClientProxy:
    """The server's handle on one client; ``cid`` is its id (Flower's attribute name).

    ``properties`` (Flower's) is a dict the server may fill; it is not part of equality.
    Flower code may subclass it (a custom proxy in tests) and register instances with a
    :class:`SimpleClientManager`, which then samples those very objects. fedhive's engine
    reaches clients through its transport, never through proxy methods.
    """

    cid: str
    properties: Properties = field(default_factory=dict, compare=False)

    @property
    def node_id(self) -> str:
        return self.cid


class Criterion(Protocol):
    """Which clients may be sampled (Flower's ``flwr.server.criterion.Criterion``);
    subclass it and implement ``select``."""

    def select(self, client: ClientProxy) -> bool: ...


class Excluding:
    """A criterion that selects every client but those in ``ids`` (and, with ``inner``,
    only those ``inner`` selects).

    The managers here recognise it without ``inner`` and sample by drawing positions and
    skipping excluded ones (:func:`sample_excluding`), so picking ``k`` idle clients costs
    O(k) draws however many clients exist, not a test of each one. ``ids`` is held, not
    copied: the asynchronous policy passes its live set of busy clients.
    """

    def __init__(self, ids: Collection[str], inner: Criterion | None = None) -> None:
        self.ids = ids
        self.inner = inner

    def select(self, client: ClientProxy) -> bool:
        if client.cid in self.ids:
            return False
        return self.inner is None or self.inner.select(client)


def sample_excluding(
    rng: np.random.Generator,
    n: int,
    k: int,
    id_at: Callable[[int], str],
    excluded: Collection[str],
) -> list[str]:
    """``k`` distinct ids, uniformly among positions ``0 .. n-1`` whose id is not excluded.

    Positions are drawn with ``rng`` and those already drawn or excluded are skipped, so
    each accepted id is uniform among the ones left: a uniformly random ordered sample
    without replacement. While at most half the population is excluded or wanted this
    takes fewer than ``2 k`` draws on average; otherwise the allowed ids are listed
    (O(n)). Fewer than ``k`` allowed ids give ``[]``. The same ``rng`` state, ``n``,
    ``id_at`` and exclusions give the same ids.
    """
    if k <= 0:
        return []
    if 2 * (len(excluded) + k) > n:
        allowed = [cid for cid in (id_at(i) for i in range(n)) if cid not in excluded]
        if len(allowed) < k:
            return []
        return [allowed[int(i)] for i in rng.choice(len(allowed), size=k, replace=False)]
    picked: list[str] = []
    seen: set[int] = set()
    while len(picked) < k:
        for position in rng.integers(0, n, size=2 * (k - len(picked))).tolist():
            if position in seen:
                continue
            seen.add(position)
            cid = id_at(position)
            if cid not in excluded:
                picked.append(cid)
                if len(picked) == k:
                    break
    return picked


class ClientManager(Protocol):
    """What strategies see of the set of clients (Flower's interface)."""

    def num_available(self) -> int: ...

    def all(self) -> dict[str, ClientProxy]: ...

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]: ...


class SimpleClientManager:
    """Holds client ids and samples among them without replacement.

    Sampling is seeded: the engine calls :meth:`set_sampling_seed` with a seed derived from
    (run seed, round, purpose) before each round's configure step, so the same seed picks
    the same clients whatever happens elsewhere. ``sample`` returns an empty list when
    fewer than ``max(num_clients, min_num_clients)`` clients are available after waiting
    up to ``wait_timeout`` seconds for them (0 in simulation, where all are there), as
    Flower does. Proxies are created when sampled, so a million ids cost only the ids.
    It is the :class:`~fedhive.transport.membership.Membership` a serving transport
    (``GrpcServer``) registers joining clients with.
    """

    def __init__(
        self, client_ids: Iterable[str] = (), seed: int | None = None, wait_timeout: float = 0.0
    ) -> None:
        self._nodes = NodeSet()
        self._proxies: dict[str, ClientProxy] = {}  # registered as objects (Flower's API)
        self.wait_timeout = wait_timeout
        self._seed = seed
        self._rng = np.random.default_rng(derive_seed(seed, 0, "", "sample"))
        for cid in client_ids:
            self.register(cid)

    def set_sampling_seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def register(self, client: ClientProxy | str) -> bool:
        """Add a client, by id or (as in Flower) as a :class:`ClientProxy`; False if it
        was already there. A registered proxy object is what ``sample``/``all`` return."""
        cid = _cid_of(client)
        added = self._nodes.register(cid)
        if added and isinstance(client, ClientProxy):
            self._proxies[cid] = client
        return added

    def unregister(self, client: ClientProxy | str) -> None:
        """Remove a client, by id or as the :class:`ClientProxy` it registered with."""
        cid = _cid_of(client)
        self._proxies.pop(cid, None)
        self._nodes.unregister(cid)

    def __len__(self) -> int:
        """How many clients are registered (Flower's ``len(client_manager)``)."""
        return self._nodes.num_available()

    def __bool__(self) -> bool:
        # A manager is there even before anyone registered: ``manager or default`` must
        # not replace an empty one (``__len__`` alone would make it falsy).
        return True

    def _proxy(self, cid: str) -> ClientProxy:
        proxy = self._proxies.get(cid)
        return proxy if proxy is not None else ClientProxy(cid)

    def num_available(self) -> int:
        return self._nodes.num_available()

    def all(self) -> dict[str, ClientProxy]:
        return {cid: self._proxy(cid) for cid in self._nodes.node_ids()}

    def wait_for(self, num_clients: int, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds until ``num_clients`` are available."""
        return self._nodes.wait_for(num_clients, timeout)

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        needed = max(num_clients, min_num_clients or 0)
        if self.wait_timeout > 0:
            self.wait_for(needed, self.wait_timeout)
        ids = sorted(self._nodes.node_ids())  # registration order must not change who is picked
        if excluding_alone(criterion, num_clients, needed):
            # [] when fewer than num_clients (== needed) are allowed, as below
            picked_ids = sample_excluding(
                self._rng, len(ids), num_clients, ids.__getitem__, criterion.ids
            )
            return [self._proxy(cid) for cid in picked_ids]
        if criterion is not None:
            ids = [cid for cid in ids if criterion.select(self._proxy(cid))]
        if num_clients <= 0 or len(ids) < needed:
            return []
        picked = self._rng.choice(len(ids), size=num_clients, replace=False)
        return [self._proxy(ids[i]) for i in picked]


def excluding_alone(
    criterion: Criterion | None, num_clients: int, needed: int
) -> TypeGuard[Excluding]:
    """Whether a sample may take the O(k) path: an :class:`Excluding` criterion alone, and
    no ``min_num_clients`` above ``num_clients`` (that one counts the allowed clients)."""
    return isinstance(criterion, Excluding) and criterion.inner is None and needed == num_clients


def _cid_of(client: ClientProxy | str) -> str:
    if isinstance(client, str):
        return client
    cid = getattr(client, "cid", None)
    if not isinstance(cid, str):
        raise ConfigError(
            f"a client is registered by its id (str) or a ClientProxy with a str cid, got "
            f"{type(client).__name__} with cid {cid!r}"
        )
    return cid
