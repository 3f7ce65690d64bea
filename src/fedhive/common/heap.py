"""Keeping Python's cyclic garbage collector off what exists before a run.

A full collection visits every object the collector tracks. A process that has imported
torch (or holds a data set as Python objects) tracks a few hundred thousand, so one full
collection takes on the order of 100 ms; a simulation round that makes and drops tens of
thousands of small objects (tasks, replies, their records) sets one off every few
rounds. :func:`gc_frozen` moves the objects that exist when a run starts into the
collector's permanent generation (:func:`gc.freeze`) for the length of the run, so
collections during the run scan only what the run made, and puts them back after
(:func:`gc.unfreeze`): nothing is kept alive longer than until the run ends.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_frozen"]


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Freeze the objects alive now for the ``with`` block; a no-op when the collector
    is off or something else has frozen objects already (that freeze is left as it is)."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
