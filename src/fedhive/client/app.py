"""The client runtime: build a client, pass a message through the mods, dispatch it.

A mod is ``mod(message, context, call_next) -> message``. Mods wrap the client in the
order given (the first mod sees the message first and the reply last), so a clipping mod
placed before a compression mod clips the update before it is compressed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from fedhive.client.client import Client
from fedhive.client.context import Context
from fedhive.client.numpy_client import NumPyClient
from fedhive.common.context import Handler, Mod
from fedhive.common.errors import ProtocolError
from fedhive.common.message import Message, MessageType
from fedhive.common.records import Code, EvaluateIns, FitIns, GetParametersIns, GetPropertiesIns

__all__ = ["ClientApp", "ClientFn", "Handler", "Mod", "build_client"]  # Handler, Mod: re-exported

ClientFn: TypeAlias = Callable[..., Client | NumPyClient]


def _takes_cid(client_fn: Callable[..., Any]) -> bool:
    """Old Flower ``client_fn(cid: str)`` or new ``client_fn(context: Context)``?"""
    try:
        params = list(inspect.signature(client_fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params:
        raise TypeError("client_fn must take one argument: `cid: str` or `context: Context`")
    first = params[0]
    if first.annotation in (str, "str"):
        return True
    if first.annotation in (Context, "Context"):
        return False
    return first.name == "cid"


def build_client(client_fn: ClientFn, context: Context, takes_cid: bool | None = None) -> Client:
    """Call ``client_fn`` with the argument it expects and return a low-level client."""
    if takes_cid is None:
        takes_cid = _takes_cid(client_fn)
    built = client_fn(context.node_id) if takes_cid else client_fn(context)
    if isinstance(built, NumPyClient):
        client = built.to_client()
    elif isinstance(built, Client):
        client = built
    else:
        raise ProtocolError(
            f"client_fn must return a NumPyClient or Client, got {type(built).__name__}"
        )
    client.context = context
    return client


def _dispatch(client: Client, message: Message) -> Message:
    mtype = message.metadata.message_type
    content = message.content
    if mtype == MessageType.FIT and isinstance(content, FitIns):
        res: Any = client.fit(content)
    elif mtype == MessageType.EVALUATE and isinstance(content, EvaluateIns):
        res = client.evaluate(content)
    elif mtype == MessageType.GET_PARAMETERS and isinstance(content, GetParametersIns):
        res = client.get_parameters(content)
    elif mtype == MessageType.GET_PROPERTIES and isinstance(content, GetPropertiesIns):
        res = client.get_properties(content)
    else:
        raise ProtocolError(
            f"no handler for message type {mtype!r} with content "
            f"{type(content).__name__}; custom stages need a client mod that handles them"
        )
    if res.status.code != Code.OK:
        return message.error_reply(f"{res.status.code.name}: {res.status.message}")
    return message.reply(res)


class ClientApp:
    """A client function plus its mods: what runs for every task a client receives.

    ``client_fn`` takes ``context: Context`` (or, as in old Flower, ``cid: str``) and
    returns a :class:`NumPyClient` or :class:`Client`. The client is built only when a
    message arrives that needs it, so mods can answer custom stages without building it.
    """

    def __init__(self, client_fn: ClientFn, mods: Sequence[Mod] = ()) -> None:
        if not callable(client_fn):
            raise TypeError(f"client_fn must be callable, got {type(client_fn).__name__}")
        self.client_fn = client_fn
        self.mods = tuple(mods)
        self._takes_cid = _takes_cid(client_fn)

    def __call__(self, message: Message, context: Context) -> Message:
        def innermost(msg: Message, ctx: Context) -> Message:
            return _dispatch(build_client(self.client_fn, ctx, self._takes_cid), msg)

        handler: Handler = innermost
        for mod in reversed(self.mods):
            handler = _wrap(mod, handler)
        return handler(message, context)

    def handle(self, message: Message, context: Context) -> Message:
        """Run one task; any exception becomes an error reply naming its type and text."""
        try:
            reply = self(message, context)
        except Exception as exc:  # a client's own failure is reported, never raised here
            return message.error_reply(f"{type(exc).__name__}: {exc}")
        if not isinstance(reply, Message):
            return message.error_reply(f"a mod returned {type(reply).__name__}, not a Message")
        return reply


def _wrap(mod: Mod, call_next: Handler) -> Handler:
    def handler(message: Message, context: Context) -> Message:
        return mod(message, context, call_next)

    return handler
