"""A population of ``n`` virtual clients ``"0"`` ... ``str(n - 1)`` that is never materialised.

``start_simulation(num_clients=n)`` registers ``n`` clients; holding a million ids, proxies
and ``node_config`` dicts would cost hundreds of MB before the first round. Here the ids
are computed when sampled: :class:`PopulationClientManager` draws positions in the sorted
id list (what :class:`~fedhive.server.client_manager.SimpleClientManager` samples from,
with the same generator, so the same seed picks the same clients) and
:func:`sorted_id` turns a position into its id in O(digits^2). :class:`NodeConfigs`
makes each client's ``node_config`` on use. Memory: O(clients sampled per round).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import overload

import numpy as np

from fedhive.common.message import derive_seed
from fedhive.common.records import Scalar
from fedhive.server.client_manager import (
    ClientProxy,
    Criterion,
    excluding_alone,
    sample_excluding,
)

__all__ = ["NodeConfigs", "PopulationClientManager", "PopulationIds", "sorted_id"]


_LISTED = 1 << 16


def _count_with_prefix(prefix: int, n: int) -> int:
    """How many of 1 .. n-1 have the decimal prefix ``prefix``."""
    count, low, high = 0, prefix, prefix + 1
    while low <= n - 1:
        count += min(n, high) - low
        low, high = low * 10, high * 10
    return count


def sorted_id(position: int, n: int) -> str:
    """The id at ``position`` of ``sorted(str(i) for i in range(n))``."""
    if not 0 <= position < n:
        raise IndexError(f"position {position} outside a population of {n}")
    if position == 0:
        return "0"
    k, current = position - 1, 1  # the k-th (from 0) of "1" .. str(n - 1) in text order
    while k > 0:
        below = _count_with_prefix(current, n)
        if below <= k:
            k -= below
            current += 1
        else:
            k -= 1
            current *= 10
    return str(current)


class PopulationIds(Sequence[str]):
    """The ids ``"0"`` ... ``str(n - 1)``, in that order, without holding them."""

    def __init__(self, n: int) -> None:
        self.n = n

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [str(i) for i in range(self.n)[index]]
        return str(range(self.n)[index])

    def __len__(self) -> int:
        return self.n


class NodeConfigs(Mapping[str, Mapping[str, Scalar]]):
    """``{str(i): {"partition-id": i, "num-partitions": n}}``, each made on use."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _index(self, key: object) -> int | None:
        if not isinstance(key, str) or not key.isdigit() or (key != "0" and key[0] == "0"):
            return None
        index = int(key)
        return index if index < self.n else None

    def __getitem__(self, key: str) -> Mapping[str, Scalar]:
        index = self._index(key)
        if index is None:
            raise KeyError(key)
        return {"partition-id": index, "num-partitions": self.n}

    def __contains__(self, key: object) -> bool:
        return self._index(key) is not None

    def __iter__(self) -> Iterator[str]:
        return (str(i) for i in range(self.n))

    def __len__(self) -> int:
        return self.n


class PopulationClientManager:
    """Seeded sampling among ``n`` clients without listing them; see the module docstring.

    ``all()`` (Flower's interface) and sampling with a ``criterion`` do list them: that
    costs what ``n`` ids cost, once per call. The exception is an
    :class:`~fedhive.server.client_manager.Excluding` criterion (the busy clients of an
    asynchronous run), sampled in O(k) draws by
    :func:`~fedhive.server.client_manager.sample_excluding`.
    """

    def __init__(self, n: int, seed: int | None = None) -> None:
        self.n = n
        self._rng = np.random.default_rng(derive_seed(seed, 0, "", "sample"))
        self._listed: list[str] | None = None

    def _id(self, position: int) -> str:
        """The id at ``position`` in text order; a population of up to ``_LISTED``
        clients lists its ids once (a few MB at most), a larger one computes each."""
        if self.n > _LISTED:
            return sorted_id(position, self.n)
        if self._listed is None:
            self._listed = sorted(map(str, range(self.n)))
        return self._listed[position]

    def set_sampling_seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def num_available(self) -> int:
        return self.n

    def _id_at(self, position: int) -> str:
        return sorted_id(position, self.n)

    def wait_for(self, num_clients: int, timeout: float = 0.0) -> bool:
        return num_clients <= self.n

    def all(self) -> dict[str, ClientProxy]:
        return {str(i): ClientProxy(str(i)) for i in range(self.n)}

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        needed = max(num_clients, min_num_clients or 0)
        if excluding_alone(criterion, num_clients, needed):
            # [] when fewer than num_clients (== needed) are allowed, as below
            ids = sample_excluding(self._rng, self.n, num_clients, self._id, criterion.ids)
            return [ClientProxy(cid) for cid in ids]
        if criterion is not None:
            ids = [
                cid
                for cid in (self._id(i) for i in range(self.n))
                if criterion.select(ClientProxy(cid))
            ]
            if num_clients <= 0 or len(ids) < needed:
                return []
            picked = self._rng.choice(len(ids), size=num_clients, replace=False)
            return [ClientProxy(ids[i]) for i in picked]
        if num_clients <= 0 or self.n < needed:
            return []
        picked = self._rng.choice(self.n, size=num_clients, replace=False)
        return [ClientProxy(self._id(i)) for i in picked.tolist()]
