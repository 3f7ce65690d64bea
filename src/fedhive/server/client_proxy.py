"""Flower's ``flwr.server.client_proxy``: the server's handle on one client."""

from fedhive.server.client_manager import ClientProxy

__all__ = ["ClientProxy"]
