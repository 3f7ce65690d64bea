"""Flower's ``Server`` object: the strategy and the client manager a run uses.

Flower code builds one and hands it over, ``start_server(server=server, ...)`` or
``start_simulation(server=server, ...)``; fedhive then runs its own engine with that
server's strategy and client manager. The rounds themselves are the engine's
(:mod:`fedhive.server.engine`): a subclass that overrides ``fit``, ``fit_round`` or
``evaluate_round`` is refused with an error naming the method (it would otherwise be
ignored without a word); strategy methods and round callbacks are the hooks that run.

Example::

    server = Server(client_manager=SimpleClientManager(), strategy=FedAvg())
    start_simulation(client_fn=client_fn, num_clients=10, server=server, config=config)
"""

from __future__ import annotations

from fedhive.common.errors import ConfigError
from fedhive.server.client_manager import ClientManager
from fedhive.server.strategy.base import Strategy
from fedhive.server.strategy.fedavg import FedAvg

__all__ = ["Server", "unpack_server"]

#: Flower's round loop; fedhive's engine replaces it, so overriding these is refused.
_ENGINE_METHODS = ("fit", "fit_round", "evaluate_round", "disconnect_all_clients")


class Server:
    """The strategy and client manager of a run (Flower's ``flwr.server.Server``).

    ``client_manager`` is required and ``strategy`` defaults to :class:`FedAvg`, as in
    Flower; ``set_strategy``, ``set_max_workers`` and ``client_manager()`` work as there.
    ``max_workers`` is recorded only: fedhive's transports size their own workers.
    """

    def __init__(self, *, client_manager: ClientManager, strategy: Strategy | None = None) -> None:
        self._client_manager = client_manager
        self.strategy: Strategy = strategy if strategy is not None else FedAvg()
        self.max_workers: int | None = None

    def client_manager(self) -> ClientManager:
        """The client manager clients register with."""
        return self._client_manager

    def set_max_workers(self, max_workers: int | None) -> None:
        self.max_workers = max_workers

    def set_strategy(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def fit(self, num_rounds: int, timeout: float | None) -> None:
        """Not run by fedhive: pass the server to ``start_server``/``start_simulation``."""
        raise ConfigError(
            "fedhive runs the rounds in its engine: pass this Server to start_server(server=...) "
            "or start_simulation(server=...)"
        )

    def fit_round(self, server_round: int, timeout: float | None) -> None:
        """Not run by fedhive (see :meth:`fit`)."""
        self.fit(server_round, timeout)

    def evaluate_round(self, server_round: int, timeout: float | None) -> None:
        """Not run by fedhive (see :meth:`fit`)."""
        self.fit(server_round, timeout)

    def disconnect_all_clients(self, timeout: float | None) -> None:
        """Not run by fedhive (see :meth:`fit`)."""
        self.fit(0, timeout)


def unpack_server(
    server: Server | None, strategy: Strategy | None, client_manager: ClientManager | None
) -> tuple[Strategy | None, ClientManager | None]:
    """The strategy and client manager to run: ``server``'s unless given explicitly.

    Refuses a ``server`` that is not a :class:`Server`, or one whose class overrides the
    round loop (``fit``, ``fit_round``, ...), which fedhive's engine would not call.
    """
    if server is None:
        return strategy, client_manager
    if not isinstance(server, Server):
        raise ConfigError(f"server must be a fedhive.server.Server, got {type(server).__name__}")
    replaced = [m for m in _ENGINE_METHODS if getattr(type(server), m) is not getattr(Server, m)]
    if replaced:
        raise ConfigError(
            f"{type(server).__name__} overrides {', '.join(replaced)}, which fedhive does not "
            "call (its engine runs the rounds); move that logic into the strategy "
            "(configure_fit, aggregate_fit, ...) or a round callback"
        )
    return (
        strategy if strategy is not None else server.strategy,
        client_manager if client_manager is not None else server.client_manager(),
    )
