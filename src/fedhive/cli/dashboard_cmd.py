"""``fedhive server --dashboard HOST:PORT``: the live page of a running server
(:mod:`fedhive.server.dashboard`), set up from the server's config."""

from __future__ import annotations

from collections.abc import Mapping

from fedhive.cli.deploy_common import err
from fedhive.cli.server_config import DeployConfig
from fedhive.server.client_manager import SimpleClientManager
from fedhive.server.dashboard import (
    Dashboard,
    LiveState,
    dashboard_access,
    is_loopback,
    parse_address,
)

__all__ = ["prepare_dashboard"]


def prepare_dashboard(
    address: str,
    cfg: DeployConfig,
    tokens: Mapping[str, str] | None,
    tls: bool,
    client_manager: SimpleClientManager,
) -> tuple[Dashboard, LiveState]:
    """The dashboard on ``address`` (not started yet) and the round callback feeding it.

    Checked before anything listens: an address that is not loopback needs ``tokens``
    (the clients' enrolment; :class:`~fedhive.common.errors.ConfigError` otherwise). With
    ``tls`` the page is served over HTTPS with the server's certificate and key.
    """
    host, _ = parse_address(address)
    access = dashboard_access(host, tokens)
    if not is_loopback(host) and not tls:
        err.print(
            "[yellow]warning:[/] the dashboard's tokens travel in the clear without TLS",
            highlight=False,
        )
    description = f"strategy {cfg.strategy.name}"
    if cfg.policy.name != "sync":
        description += f", policy {cfg.policy.describe()}"
    state = LiveState(client_manager, cfg.rounds, description)
    files = (cfg.tls.cert, cfg.tls.key) if tls else None
    return Dashboard(address, state, access, files), state
