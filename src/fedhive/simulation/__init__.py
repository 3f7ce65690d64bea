"""Simulate many clients on one machine."""

from fedhive.simulation.app import start_simulation

__all__ = ["start_simulation"]
