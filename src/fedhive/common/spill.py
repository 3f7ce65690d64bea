"""Large messages staged on disk, and reading them back with bounded memory.

A server that takes in many large uploads at once would hold each one whole in memory
until it is folded into the aggregate. :class:`SpillFile` instead writes a message's
chunks to an anonymous temporary file as they arrive; once complete, the message is read
through a shared memory mapping of that file (:class:`SpillMap`), so arrays decoded
from it are ordinary writable numpy arrays whose pages come from the file.

Pages of a mapping that have been read count towards the process's resident memory
until they are unmapped. Code that streams over a large array once (validation, the
weighted-mean fold) calls :func:`page_dropper` and drops each part as it is done with
it, so only the part being read is resident. A dropped page is read back from the file
if it is touched again, and writes are kept (the mapping is shared), so dropping never
changes what the array holds. The file has no name; its space is freed when the last
array viewing it is freed.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["DROP_BYTES", "SpillFile", "SpillMap", "page_dropper", "read_slices"]

#: How much of a spilled array streaming readers go through between drops.
DROP_BYTES = 4 << 20

_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class SpillMap(mmap.mmap):
    """A shared, writable mapping of a spilled message's file."""

    address: int = 0


class SpillFile:
    """Writes one message's bytes, in order, to an anonymous temporary file.

    ``directory`` is where the file is made (the system's temporary directory by
    default). Raises :class:`OSError` when the file cannot be made or written.
    """

    def __init__(self, nbytes: int, directory: str | os.PathLike[str] | None = None) -> None:
        self.nbytes = nbytes
        self.filled = 0
        self._file = tempfile.TemporaryFile(dir=directory, buffering=0)  # noqa: SIM115 (kept open)

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; the caller has checked it fits in ``nbytes``."""
        view = memoryview(data).cast("B")
        while view:
            written = self._file.write(view)
            if not written:
                raise OSError("the temporary file took no bytes (disk full?)")
            view = view[written:]
            self.filled += written

    def finish(self) -> memoryview:
        """The whole message, as a writable view of a mapping of the file."""
        try:
            if self.filled != self.nbytes:
                raise OSError(f"{self.filled} of {self.nbytes} bytes were written")
            if self.nbytes == 0:
                return memoryview(bytearray())
            mapping = SpillMap(self._file.fileno(), self.nbytes, access=mmap.ACCESS_WRITE)
        finally:
            self.close()  # the mapping keeps the file alive
        probe = np.frombuffer(mapping, np.uint8, count=1)
        mapping.address = probe.ctypes.data
        del probe
        return memoryview(mapping)

    def close(self) -> None:
        """Drop the file (a mapping already made stays valid)."""
        self._file.close()


def _spill_map(array: np.ndarray) -> SpillMap | None:
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, SpillMap) else None


def page_dropper(array: np.ndarray) -> Callable[[int, int], None] | None:
    """For an array read from a :class:`SpillMap`, a function that unmaps the pages
    holding its flat elements ``[start, stop)``; ``None`` for any other array.

    Only whole pages inside the range are dropped, so a page shared with elements
    outside it stays. The array must be C-contiguous. Each call is a system call that
    every thread of the process feels (its page tables change), so callers drop a few
    megabytes at a time rather than every page as they go.
    """
    mapping = _spill_map(array)
    if mapping is None or _DONTNEED is None or not array.flags.c_contiguous:
        return None
    origin = array.ctypes.data - mapping.address
    itemsize = array.itemsize
    page = mmap.PAGESIZE
    size = len(mapping)

    def drop(start: int, stop: int) -> None:
        first = -(-(origin + start * itemsize) // page) * page
        end = origin + stop * itemsize
        last = size if end >= size else end // page * page
        if last > first:
            mapping.madvise(_DONTNEED, first, last - first)

    return drop


def read_slices(flat: np.ndarray, step: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive ``step``-element slices of the 1-D ``flat``, for
    one pass over it. When ``flat`` is read from a :class:`SpillMap`, the pages of the
    slices already handed out are dropped every :data:`DROP_BYTES` (and at the end), so
    the pass keeps only a few megabytes of it resident.
    """
    drop = page_dropper(flat)
    every = max(step, DROP_BYTES // max(flat.itemsize, 1))
    dropped = 0
    for start in range(0, flat.size, step):
        stop = min(start + step, flat.size)
        yield start, stop
        if drop is not None and (stop - dropped >= every or stop == flat.size):
            drop(dropped, stop)
            dropped = stop
