"""Which clients exist, and seeded sampling among them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedhive.common.message import derive_seed
from fedhive.transport.membership import NodeSet

__all__ = ["ClientProxy", "Criterion", "ClientManager", "SimpleClientManager"]


@dataclass(frozen=True, slots=True)
class ClientProxy:
    """The server's handle on one client; ``cid`` is its id (Flower's attribute name)."""

    cid: str

    @property
    def node_id(self) -> str:
        return self.cid


class Criterion(Protocol):
    def select(self, client: ClientProxy) -> bool: ...


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
        self.wait_timeout = wait_timeout
        self._seed = seed
        self._rng = np.random.default_rng(derive_seed(seed, 0, "", "sample"))
        for cid in client_ids:
            self.register(cid)

    def set_sampling_seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def register(self, cid: str) -> bool:
        return self._nodes.register(cid)

    def unregister(self, cid: str) -> None:
        self._nodes.unregister(cid)

    def num_available(self) -> int:
        return self._nodes.num_available()

    def all(self) -> dict[str, ClientProxy]:
        return {cid: ClientProxy(cid) for cid in self._nodes.node_ids()}

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
        if criterion is not None:
            ids = [cid for cid in ids if criterion.select(ClientProxy(cid))]
        if num_clients <= 0 or len(ids) < needed:
            return []
        picked = self._rng.choice(len(ids), size=num_clients, replace=False)
        return [ClientProxy(ids[i]) for i in picked]
