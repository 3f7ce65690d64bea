"""Transports carry messages between the engine and clients."""

from fedhive.transport.base import Replies, ReplySlot, Transport
from fedhive.transport.inprocess import InProcessTransport

__all__ = ["InProcessTransport", "Replies", "ReplySlot", "Transport"]
