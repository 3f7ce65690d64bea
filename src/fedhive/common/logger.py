"""Flower's ``flwr.common.logger.log``: log through fedhive's logger.

``log(INFO, "round %s done", rnd)`` goes to the ``"fedhive"`` logger (configure it with
the standard :mod:`logging` module), so Flower code that logs this way keeps working.
"""

from __future__ import annotations

import logging

__all__ = ["FEDHIVE_LOGGER", "log"]

FEDHIVE_LOGGER = logging.getLogger("fedhive")


def log(level: int, msg: object, *args: object, **kwargs: object) -> None:
    """``logging.getLogger("fedhive").log(level, msg, *args)``, Flower's signature."""
    FEDHIVE_LOGGER.log(level, msg, *args, **kwargs)  # type: ignore[arg-type]
