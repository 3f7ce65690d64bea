"""The server side: the round engine, strategies, history and checkpoints."""

from fedhive.common.clock import Clock, ManualClock, SystemClock
from fedhive.server import strategy
from fedhive.server.checkpoint import Checkpointer, load_npz, save_npz
from fedhive.server.client_manager import ClientManager, ClientProxy, SimpleClientManager
from fedhive.server.config import ServerConfig
from fedhive.server.engine import Engine, RoundCallback, RoundDriver, default_fit_workflow
from fedhive.server.history import History
from fedhive.server.start import start_server

__all__ = [
    "Checkpointer",
    "ClientManager",
    "ClientProxy",
    "Clock",
    "Engine",
    "History",
    "ManualClock",
    "RoundCallback",
    "RoundDriver",
    "ServerConfig",
    "SimpleClientManager",
    "SystemClock",
    "default_fit_workflow",
    "load_npz",
    "save_npz",
    "start_server",
    "strategy",
]
