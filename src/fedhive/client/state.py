"""Per-client persistent state for virtual clients.

Virtual clients are rebuilt for every task, so their state lives here between tasks: a
client's :class:`RecordDict` is kept in memory while small and written to disk (fedhive's
own array format, never pickle) once its arrays exceed ``memory_limit_bytes``. The whole
store is part of every checkpoint.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from pathlib import Path

from fedhive.common.atomic import SECRET_MODE, atomic_write_bytes, fsync_dir
from fedhive.common.errors import SerdeError, StateError
from fedhive.common.records import RecordDict
from fedhive.common.serde import decode_record_dict, encode_record_dict

# atomic_write_bytes lives in fedhive.common.atomic; kept importable here for compatibility
__all__ = ["StateStore", "atomic_write_bytes"]


def _file_name(node_id: str) -> str:
    digest = hashlib.blake2b(node_id.encode(), digest_size=12).hexdigest()
    return f"state-{digest}.fhv"


class StateStore:
    """Thread-safe map ``node_id -> RecordDict`` that spills large states to disk.

    ``directory`` is where large states go (a temporary folder when ``None``). A state
    whose arrays exceed ``memory_limit_bytes`` goes to disk; with ``total_memory_bytes``
    so does any state that would bring the arrays held in memory above that total.
    A state on disk is rewritten only when it changed (an evaluation that reads it
    writes nothing).
    Memory: the sum of the states in memory (at most ``total_memory_bytes`` when given),
    plus one state per task in flight.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        memory_limit_bytes: int = 1 << 20,
        total_memory_bytes: int | None = None,
    ) -> None:
        if memory_limit_bytes < 0:
            raise StateError(f"memory_limit_bytes must be >= 0, got {memory_limit_bytes}")
        if total_memory_bytes is not None and total_memory_bytes < 0:
            raise StateError(f"total_memory_bytes must be >= 0, got {total_memory_bytes}")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedhive-state-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.memory_limit_bytes = memory_limit_bytes
        self.total_memory_bytes = total_memory_bytes
        self._memory: dict[str, RecordDict] = {}
        self._sizes: dict[str, int] = {}
        self._in_memory = 0
        self._on_disk: set[str] = set()
        self._digests: dict[str, bytes] = {}
        #: How many times a state was written to disk (unchanged states are not).
        self.disk_writes = 0
        self._lock = threading.Lock()

    @property
    def memory_bytes(self) -> int:
        """Bytes of the arrays of the states held in memory."""
        with self._lock:
            return self._in_memory

    def _fits(self, node_id: str, size: int) -> bool:
        if size > self.memory_limit_bytes:
            return False
        if self.total_memory_bytes is None:
            return True
        return self._in_memory - self._sizes.get(node_id, 0) + size <= self.total_memory_bytes

    def get(self, node_id: str) -> RecordDict:
        """The stored state of ``node_id`` (a fresh empty one if it has none)."""
        with self._lock:
            if node_id in self._memory:
                return self._memory[node_id]
            on_disk = node_id in self._on_disk
        if not on_disk:
            return RecordDict()
        path = self.directory / _file_name(node_id)
        try:
            return decode_record_dict(bytearray(path.read_bytes()))
        except (OSError, SerdeError) as exc:
            raise StateError(
                f"cannot load the state of client {node_id!r} from {path}: {exc}"
            ) from exc

    def put(self, node_id: str, state: RecordDict) -> None:
        """Store ``state`` for ``node_id``, on disk if its arrays are large."""
        if state.is_empty():  # what get() gives anyway: a million clients stay free
            with self._lock:
                if node_id in self._memory:
                    del self._memory[node_id]
                    self._in_memory -= self._sizes.pop(node_id, 0)
                was_on_disk = node_id in self._on_disk
                self._on_disk.discard(node_id)
                self._digests.pop(node_id, None)
            if was_on_disk:
                (self.directory / _file_name(node_id)).unlink(missing_ok=True)
            return
        size = state.nbytes()
        with self._lock:
            in_memory = self._fits(node_id, size)
            if in_memory:
                self._memory[node_id] = state
                self._in_memory += size - self._sizes.get(node_id, 0)
                self._sizes[node_id] = size
                was_on_disk = node_id in self._on_disk
                self._on_disk.discard(node_id)
                self._digests.pop(node_id, None)
        if in_memory:
            if was_on_disk:
                (self.directory / _file_name(node_id)).unlink(missing_ok=True)
            return
        data = encode_record_dict(state)
        digest = hashlib.blake2b(data, digest_size=16).digest()
        with self._lock:
            unchanged = node_id in self._on_disk and self._digests.get(node_id) == digest
        if not unchanged:
            # client state holds secrets (SecAgg+ round keys, identity keys): owner only.
            # A spilled state is a cache of this run (checkpoints hold the durable copy):
            # its folder is not synced on every write.
            atomic_write_bytes(
                self.directory / _file_name(node_id), data, mode=SECRET_MODE, sync_dir=False
            )
        with self._lock:
            if not unchanged:
                self.disk_writes += 1
            if node_id in self._memory:
                del self._memory[node_id]
                self._in_memory -= self._sizes.pop(node_id, 0)
            self._on_disk.add(node_id)
            self._digests[node_id] = digest

    def close(self) -> None:
        """Delete the temporary folder, if the store made one (its states are gone)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def node_ids(self) -> list[str]:
        with self._lock:
            return sorted(set(self._memory) | self._on_disk)

    def __len__(self) -> int:
        return len(self.node_ids())

    def is_on_disk(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._on_disk

    def dump(self, directory: Path) -> None:
        """Write every non-empty state into ``directory`` (for checkpoints), durably: each
        file is written to a temporary name, synced and renamed into place, the folder is
        synced once they are all there, and only then is ``index.tsv`` written (the same
        way), so an index on disk never names a state that a crash could have lost."""
        directory.mkdir(parents=True, exist_ok=True)
        index = []
        for node_id in self.node_ids():
            state = self.get(node_id)
            if state.is_empty():
                continue
            name = _file_name(node_id)
            data = encode_record_dict(state)
            atomic_write_bytes(directory / name, data, mode=SECRET_MODE, sync_dir=False)
            index.append(f"{name}\t{node_id}")
        fsync_dir(directory)
        text = "\n".join(index) + ("\n" if index else "")
        atomic_write_bytes(directory / "index.tsv", text.encode(), mode=SECRET_MODE)
        fsync_dir(directory.parent)

    def load(self, directory: Path) -> None:
        """Replace the store's content with what :meth:`dump` wrote to ``directory``."""
        index_path = directory / "index.tsv"
        if not index_path.exists():
            raise StateError(f"no client state index in {directory}")
        with self._lock:
            self._memory.clear()
            self._sizes.clear()
            self._in_memory = 0
            self._on_disk.clear()
            self._digests.clear()
        for line in index_path.read_text().splitlines():
            name, _, node_id = line.partition("\t")
            if not node_id or name != _file_name(node_id):
                raise StateError(f"corrupt client state index line {line!r} in {index_path}")
            try:
                state = decode_record_dict(bytearray((directory / name).read_bytes()))
            except (OSError, SerdeError) as exc:
                raise StateError(f"cannot load the state of client {node_id!r}: {exc}") from exc
            self.put(node_id, state)
