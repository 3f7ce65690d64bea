"""Messages between the engine and clients.

Every message carries where it belongs (run id, round, model version) and what it is
(``message_type``). Built-in types are ``"fit"``, ``"evaluate"``, ``"get_parameters"`` and
``"get_properties"``; any other type (for example ``"secagg.share_keys"``) is a custom
stage whose content is a :class:`~fedhive.common.records.RecordDict`, which client mods
handle. A reply has the same metadata with ``reply_to`` set; a failed task is answered by
a reply whose ``error`` says why.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MessageType",
    "Metadata",
    "Message",
    "derive_seed",
]

_ids = itertools.count(1)
#: A message id is ``{run_id}-{counter}``, the process-wide counter in hex of at least this
#: width (2**40 messages): its length, and so every header's length on the wire, is the same
#: however many messages the process made before (a seeded run's byte counts reproduce).
_ID_DIGITS = 10


class MessageType:
    """Names of the built-in message types."""

    FIT = "fit"
    EVALUATE = "evaluate"
    GET_PARAMETERS = "get_parameters"
    GET_PROPERTIES = "get_properties"

    BUILTIN = frozenset({FIT, EVALUATE, GET_PARAMETERS, GET_PROPERTIES})


def derive_seed(seed: int | None, server_round: int, client_id: str, purpose: str) -> int:
    """A 63-bit seed derived from (run seed, round, client, purpose).

    Every random choice in a run draws from its own derived seed, so results do not depend
    on scheduling order or on the number of workers.
    """
    text = f"{seed}|{server_round}|{client_id}|{purpose}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True, slots=True)
class Metadata:
    run_id: int
    message_id: str
    node_id: str
    server_round: int
    model_version: int
    message_type: str
    reply_to: str = ""
    seed: int = 0

    def __reduce__(self) -> tuple[type[Metadata], tuple[Any, ...]]:
        # as a tuple of its fields: a slots dataclass otherwise pickles through
        # dataclasses.fields() per object, about twice as slow (the process and Ray
        # backends pickle one per task each way)
        return (
            Metadata,
            (
                self.run_id,
                self.message_id,
                self.node_id,
                self.server_round,
                self.model_version,
                self.message_type,
                self.reply_to,
                self.seed,
            ),
        )


@dataclass(slots=True)
class Message:
    """A task for one client, or its reply.

    ``content`` is ``FitIns``/``FitRes``, ``EvaluateIns``/``EvaluateRes``, ... for built-in
    types and a ``RecordDict`` for custom stages. ``error`` is set (and ``content`` is
    ``None``) when the task failed.
    """

    metadata: Metadata
    content: Any
    error: str | None = None

    def __reduce__(self) -> tuple[type[Message], tuple[Any, ...]]:
        return (Message, (self.metadata, self.content, self.error))  # as Metadata's

    @classmethod
    def task(
        cls,
        *,
        run_id: int,
        node_id: str,
        server_round: int,
        model_version: int,
        message_type: str,
        content: Any,
        seed: int = 0,
    ) -> Message:
        meta = Metadata(
            run_id=run_id,
            message_id=f"{run_id}-{next(_ids):0{_ID_DIGITS}x}",
            node_id=node_id,
            server_round=server_round,
            model_version=model_version,
            message_type=message_type,
            seed=seed,
        )
        return cls(meta, content)

    def _reply_metadata(self) -> Metadata:
        m = self.metadata  # a reply keeps the task's fields and points back at it
        return Metadata(
            m.run_id,
            m.message_id,
            m.node_id,
            m.server_round,
            m.model_version,
            m.message_type,
            m.message_id,
            m.seed,
        )

    def reply(self, content: Any) -> Message:
        """A successful reply to this task."""
        return Message(self._reply_metadata(), content)

    def error_reply(self, reason: str) -> Message:
        """A reply saying that this task failed, and why."""
        return Message(self._reply_metadata(), None, error=reason)

    @property
    def has_error(self) -> bool:
        return self.error is not None
