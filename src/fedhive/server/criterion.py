"""Flower's ``flwr.server.criterion``: which clients may be sampled."""

from fedhive.server.client_manager import Criterion

__all__ = ["Criterion"]
