"""The server side: the round engine, run policies, round stages, strategies, history
and checkpoints."""

from fedhive.common.clock import Clock, ManualClock, SystemClock, VirtualClock
from fedhive.server import client_proxy, criterion, strategy
from fedhive.server.asynchronous import BufferedAsync
from fedhive.server.checkpoint import Checkpointer, load_npz, save_npz
from fedhive.server.client_manager import (
    ClientManager,
    ClientProxy,
    Criterion,
    SimpleClientManager,
)
from fedhive.server.config import ServerConfig
from fedhive.server.engine import Engine, RoundCallback, RoundDriver, default_fit_workflow
from fedhive.server.history import History
from fedhive.server.policy import RunPolicy, SyncRounds
from fedhive.server.server import Server
from fedhive.server.start import start_server

__all__ = [
    "BufferedAsync",
    "Checkpointer",
    "ClientManager",
    "ClientProxy",
    "Clock",
    "Criterion",
    "Engine",
    "History",
    "ManualClock",
    "RoundCallback",
    "RoundDriver",
    "RunPolicy",
    "Server",
    "ServerConfig",
    "SimpleClientManager",
    "SyncRounds",
    "SystemClock",
    "VirtualClock",
    "client_proxy",
    "criterion",
    "default_fit_workflow",
    "load_npz",
    "save_npz",
    "start_server",
    "strategy",
]
