"""What a client knows about itself: its node, its partition and its persistent state."""

from __future__ import annotations

from fedhive.common.context import Context

__all__ = ["Context", "HasContext"]


class HasContext:
    """The ``context`` attribute of clients, set by the runtime before each task."""

    _context: Context | None = None

    @property
    def context(self) -> Context:
        if self._context is None:
            raise AttributeError("the client has no context until the runtime sets one")
        return self._context

    @context.setter
    def context(self, value: Context) -> None:
        self._context = value

    def get_context(self) -> Context:
        return self.context

    def set_context(self, context: Context) -> None:
        self.context = context
