"""Simulate many clients on one machine."""

from fedhive.simulation.app import start_simulation
from fedhive.simulation.backends import (
    Backend,
    ClientSetup,
    RayOptions,
    backend_names,
    register_backend,
)
from fedhive.simulation.system import SystemModel

__all__ = [
    "Backend",
    "ClientSetup",
    "RayOptions",
    "SystemModel",
    "backend_names",
    "register_backend",
    "start_simulation",
]
