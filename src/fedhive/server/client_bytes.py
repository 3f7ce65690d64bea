"""A round's bytes per client (``bytes_clients``), packed.

A round record's ``bytes_clients`` maps each client id to ``{"up": n, "down": n}``. Kept
as a dict of dicts it costs about 330 bytes per client and round, so a run of 1,000
clients per round grows its history by a third of a megabyte every round. The history
keeps it instead as :class:`ClientBytes`: a read-only mapping with the same items, whose
client ids are one joined string and whose counts are one array of 64-bit integers
(about 25 bytes per client for six-digit ids). It compares equal to the dict form, and
the history's JSON export writes it as that dict.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping

__all__ = ["ClientBytes"]

_SEP = "\x00"


class ClientBytes(Mapping[str, dict[str, int]]):
    """``{client id: {"up": bytes, "down": bytes}}``, packed (module docstring)."""

    __slots__ = ("_counts", "_ids", "_index", "_joined")

    def __init__(self, counts: Mapping[str, tuple[int, int] | list[int]]) -> None:
        ids = list(counts)
        joinable = all(_SEP not in cid for cid in ids)
        self._joined: str | None = _SEP.join(ids) if joinable and ids else None
        self._ids: tuple[str, ...] | None = None if joinable else tuple(ids)
        self._counts = array("q")
        for up, down in counts.values():
            self._counts.append(int(up))
            self._counts.append(int(down))
        self._index: dict[str, int] | None = None  # built on the first lookup by id

    def _id_list(self) -> list[str] | tuple[str, ...]:
        if self._ids is not None:
            return self._ids
        return [] if self._joined is None else self._joined.split(_SEP)

    def __len__(self) -> int:
        return len(self._counts) // 2

    def __iter__(self) -> Iterator[str]:
        return iter(self._id_list())

    def __getitem__(self, cid: str) -> dict[str, int]:
        if self._index is None:
            self._index = {c: i for i, c in enumerate(self._id_list())}
        i = self._index[cid]
        return {"up": self._counts[2 * i], "down": self._counts[2 * i + 1]}

    def items(self) -> list[tuple[str, dict[str, int]]]:  # type: ignore[override]
        counts = self._counts
        return [
            (cid, {"up": counts[2 * i], "down": counts[2 * i + 1]})
            for i, cid in enumerate(self._id_list())
        ]

    def values(self) -> list[dict[str, int]]:  # type: ignore[override]
        counts = self._counts
        return [{"up": counts[2 * i], "down": counts[2 * i + 1]} for i in range(len(self))]

    def nbytes(self) -> int:
        """What the packed form holds, in bytes (ids and counts, not the lookup index)."""
        ids = len(self._joined) if self._joined is not None else 0
        ids += sum(len(c) + 49 for c in self._ids or ())
        return ids + self._counts.itemsize * len(self._counts)

    def __repr__(self) -> str:
        return f"ClientBytes({dict(self.items())!r})"

    def __reduce__(self) -> tuple[type, tuple[dict[str, tuple[int, int]]]]:
        return ClientBytes, ({c: (v["up"], v["down"]) for c, v in self.items()},)
