"""Who is connected: what a serving transport tells the layers above it.

A transport that clients join (the gRPC server) calls :meth:`Membership.register` when a
client is admitted and :meth:`Membership.unregister` when it leaves. The server's
client managers (:class:`fedhive.server.client_manager.SimpleClientManager`) satisfy the
protocol, so the transport needs nothing from the server package; :class:`NodeSet` is the
plain set of joined ids a transport keeps when it is given no manager.
"""

from __future__ import annotations

import threading
from typing import Protocol, final

__all__ = ["Membership", "NodeSet"]


class Membership(Protocol):
    """Told by a transport which nodes joined and left."""

    def register(self, node_id: str) -> bool:
        """Add ``node_id``; False if it was there already."""
        ...

    def unregister(self, node_id: str) -> None:
        """Remove ``node_id`` (an unknown one is ignored)."""
        ...


@final
class NodeSet:
    """A thread-safe set of node ids, in registration order, that can be waited on.

    Removal moves the last id into the freed place, so register and unregister are O(1)
    and a million ids cost only the ids.
    """

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._changed = threading.Condition()

    def register(self, node_id: str) -> bool:
        with self._changed:
            if node_id in self._index:
                return False
            self._index[node_id] = len(self._ids)
            self._ids.append(node_id)
            self._changed.notify_all()
            return True

    def unregister(self, node_id: str) -> None:
        with self._changed:
            pos = self._index.pop(node_id, None)
            if pos is None:
                return
            last = self._ids.pop()
            if pos < len(self._ids):
                self._ids[pos] = last
                self._index[last] = pos
            self._changed.notify_all()

    def num_available(self) -> int:
        with self._changed:
            return len(self._ids)

    def node_ids(self) -> list[str]:
        """A snapshot of the ids (order changes when ids leave)."""
        with self._changed:
            return list(self._ids)

    def __contains__(self, node_id: object) -> bool:
        with self._changed:
            return node_id in self._index

    def __len__(self) -> int:
        return self.num_available()

    def wait_for(self, num_nodes: int, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds until ``num_nodes`` are registered."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._ids) >= num_nodes, timeout)
