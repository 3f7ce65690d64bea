"""What this process may use of its machine: cgroup CPU quota and memory limit, CPU affinity.

Under Slurm, Kubernetes or Docker a job sees the whole node in ``os.cpu_count()`` and
``/proc/meminfo`` while its cgroup allows a fraction of it; a scheduler sized from the
node's view oversubscribes the job (threads thrash, the kernel's OOM killer ends it).
:func:`node_limits` reads cgroup v2 (``cpu.max``, ``memory.max``) and v1
(``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, ``memory.limit_in_bytes``), taking the
tightest limit of the process's cgroup and its ancestors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NodeLimits", "cgroup_limits", "node_limits", "physical_memory"]

# cgroup v1 writes "no limit" as a huge page-aligned number
_UNLIMITED_BYTES = 1 << 60


@dataclass(frozen=True)
class NodeLimits:
    """CPUs (fractional for a quota) and bytes of memory; ``None`` where nothing limits."""

    cpus: float | None = None
    memory: int | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _chain(root: Path, relative: str) -> list[Path]:
    """The cgroup folder of this process and its ancestors, up to ``root``."""
    parts = [p for p in relative.strip("/").split("/") if p]
    folders = [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def _v2(folders: list[Path]) -> NodeLimits:
    cpus: float | None = None
    memory: int | None = None
    for folder in folders:
        quota = (_read(folder / "cpu.max") or "max").split()
        if len(quota) == 2 and quota[0] != "max":
            share = int(quota[0]) / int(quota[1])
            cpus = share if cpus is None else min(cpus, share)
        limit = _read(folder / "memory.max")
        if limit is not None and limit.isdigit():
            memory = int(limit) if memory is None else min(memory, int(limit))
    return NodeLimits(cpus, memory)


def _v1(root: Path, controllers: dict[str, str]) -> NodeLimits:
    cpus: float | None = None
    memory: int | None = None
    for names, relative in controllers.items():
        if "cpu" in names.split(","):
            for folder in _chain(root / names, relative) or _chain(root / "cpu", relative):
                quota = _read(folder / "cpu.cfs_quota_us")
                period = _read(folder / "cpu.cfs_period_us")
                if quota and period and quota.lstrip("-").isdigit() and int(quota) > 0:
                    share = int(quota) / int(period)
                    cpus = share if cpus is None else min(cpus, share)
        if "memory" in names.split(","):
            for folder in _chain(root / names, relative):
                limit = _read(folder / "memory.limit_in_bytes")
                if limit is not None and limit.isdigit() and int(limit) < _UNLIMITED_BYTES:
                    memory = int(limit) if memory is None else min(memory, int(limit))
    return NodeLimits(cpus, memory)


def cgroup_limits(
    root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
) -> NodeLimits:
    """The CPU quota and memory limit of this process's cgroup (v2 or v1)."""
    root = Path(root)
    text = _read(Path(proc_cgroup)) or ""
    controllers: dict[str, str] = {}
    unified: str | None = None
    for line in text.splitlines():
        _, names, relative = [*line.split(":", 2), "", ""][:3]
        if names == "":
            unified = relative
        else:
            controllers[names] = relative
    if (root / "cgroup.controllers").exists():
        return _v2(_chain(root, unified or "/"))
    return _v1(root, controllers)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def node_limits() -> NodeLimits:
    """What this process may use: whole CPUs (cgroup quota, affinity) and memory bytes."""
    cgroup = cgroup_limits()
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
    cpus = cpus or float(os.cpu_count() or 1)
    if cgroup.cpus is not None:
        cpus = min(cpus, max(1.0, math.floor(cgroup.cpus)))
    memory = physical_memory()
    if cgroup.memory is not None:
        memory = cgroup.memory if memory is None else min(memory, cgroup.memory)
    return NodeLimits(cpus, memory)
