"""The client side: Flower 1.x's ``NumPyClient`` and ``Client``, mods and state."""

from fedhive.client.app import ClientApp, ClientFn, Mod, build_client
from fedhive.client.client import Client
from fedhive.client.context import Context
from fedhive.client.numpy_client import NumPyClient
from fedhive.client.policy import SitePolicy, policy_mod
from fedhive.client.start import start_client, start_clients, start_numpy_client
from fedhive.client.state import StateStore

__all__ = [
    "Client",
    "ClientApp",
    "ClientFn",
    "Context",
    "Mod",
    "NumPyClient",
    "SitePolicy",
    "StateStore",
    "build_client",
    "policy_mod",
    "start_client",
    "start_clients",
    "start_numpy_client",
]
