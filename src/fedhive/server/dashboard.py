"""A live, read-only page for a running server: ``fedhive server --dashboard HOST:PORT``.

:class:`LiveState` is a round callback that keeps what the page shows (the connected
clients, the round or model version, each round's results, failures with their reasons,
bytes moved and privacy spent); :class:`Dashboard` serves it over HTTP from a thread of
its own (the standard library's ``http.server``): the page at ``/``, its script and
styles, and the state as JSON at ``/api/state``, which the page polls every second. It
never changes anything in the run: every route is a GET.

Who may look: on a loopback address (``127.0.0.1``, ``::1``, ``localhost``, the default)
anyone on this machine; on any other address only a holder of an enrolled client's
token, the same ``node_id -> token`` enrolment the clients authenticate with, given as
HTTP Basic credentials (user name: the node id, password: its token) and compared in
constant time. :func:`dashboard_access` refuses an exposed dashboard without tokens.
With ``tls`` (the server's certificate and key files) the page is served over HTTPS.

Example::

    state = LiveState(client_manager, rounds=10)
    with Dashboard("127.0.0.1:8081", state) as board:
        print(board.url)
        start_server(..., client_manager=client_manager, callbacks=[state])
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import math
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from fedhive.common.errors import ConfigError
from fedhive.server.engine import RoundCallback

if TYPE_CHECKING:
    from fedhive.server.client_manager import SimpleClientManager
    from fedhive.server.engine import Engine
    from fedhive.server.history import History

__all__ = ["Dashboard", "DashboardAccess", "LiveState", "dashboard_access", "parse_address"]

#: Rounds and failures the page can show (older ones are dropped: the files keep them).
MAX_ROUNDS = 1000
MAX_FAILURES = 200
_REASON_CHARS = 500

log = logging.getLogger("fedhive.server.dashboard")


def parse_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:8081"``, ``"[::1]:8081"``, ``"localhost:0"`` or a bare port
    (``"8081"``: loopback) as ``(host, port)``; :class:`ConfigError` otherwise."""
    text = address.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"--dashboard {address!r}: expected HOST:PORT (e.g. 127.0.0.1:8081) or a port"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (no other machine can reach it)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DashboardAccess:
    """Who may read the page: anyone who reaches it (``tokens`` is ``None``) or a holder
    of one enrolled ``node_id -> token`` pair, as HTTP Basic credentials."""

    tokens: Mapping[str, str] | None = None

    def allows(self, authorization: str | None) -> bool:
        if self.tokens is None:
            return True
        scheme, _, encoded = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, token = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.tokens.get(user)
        # constant time in the token; an unknown node id still costs one comparison
        good = hmac.compare_digest((expected or "\0").encode(), token.encode())
        return bool(sep) and expected is not None and good


def dashboard_access(host: str, tokens: Mapping[str, str] | None) -> DashboardAccess:
    """The access rule for a dashboard on ``host``: open on loopback, the clients'
    tokens elsewhere (:class:`ConfigError` when an exposed dashboard has none)."""
    if is_loopback(host):
        return DashboardAccess()
    if not tokens:
        raise ConfigError(
            f"--dashboard on {host} is reachable from other machines, so it needs the clients' "
            "token enrolment (--tokens FILE; viewers log in with an enrolled node id and its "
            "token); or bind it to 127.0.0.1 and reach it through an SSH tunnel"
        )
    return DashboardAccess(dict(tokens))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _round_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the page shows of one round record (no per-client arrays)."""
    central = record.get("centralized") or {}
    dist = record.get("distributed") or {}
    fit = record.get("fit") or {}
    fit_metrics = fit.get("metrics") or {}
    failures = list(record.get("failures") or []) + list(dist.get("failures") or [])
    return {
        "round": int(record["round"]),
        "model_version": record.get("model_version"),
        "accuracy": _number(central.get("accuracy", (dist.get("metrics") or {}).get("accuracy"))),
        "loss": _number(central.get("loss", dist.get("loss"))),
        "fit_clients": fit.get("num_clients"),
        "fit_results": fit.get("num_results"),
        "evaluate_results": dist.get("num_results"),
        "failures": len(failures),
        "bytes_up": int(record.get("bytes_up") or 0),
        "bytes_down": int(record.get("bytes_down") or 0),
        "epsilon": _number(fit_metrics.get("epsilon")),
        "elapsed_s": _number(record.get("elapsed_s")),
        "virtual_time_s": _number(record.get("virtual_time_s")),
    }


class LiveState(RoundCallback):
    """What the dashboard shows, updated by the engine's callbacks and read by the page's
    requests (under one lock: the engine thread writes, HTTP threads read)."""

    def __init__(
        self, client_manager: SimpleClientManager, rounds: int, description: str = ""
    ) -> None:
        self.client_manager = client_manager
        self.rounds_total = rounds
        self.description = description
        self._lock = threading.Lock()
        self._status = "waiting for clients"
        self._rounds: deque[dict[str, Any]] = deque(maxlen=MAX_ROUNDS)
        self._failures: deque[dict[str, Any]] = deque(maxlen=MAX_FAILURES)
        self._totals = {"bytes_up": 0, "bytes_down": 0, "failures": 0}
        self._epsilon: float | None = None
        self._started = time.time()

    def on_run_start(self, engine: Engine) -> None:
        with self._lock:
            self._status = "running"

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        summary = _round_summary(record)
        with self._lock:
            if self._status == "waiting for clients":
                self._status = "running"
            self._rounds.append(summary)
            self._totals["bytes_up"] += summary["bytes_up"]
            self._totals["bytes_down"] += summary["bytes_down"]
            self._totals["failures"] += summary["failures"]
            if summary["epsilon"] is not None:
                self._epsilon = summary["epsilon"]
            dist = record.get("distributed") or {}
            for failure in list(record.get("failures") or []) + list(dist.get("failures") or []):
                reason = " ".join(str(failure.get("reason", "")).split())[:_REASON_CHARS]
                self._failures.append(
                    {
                        "round": summary["round"],
                        "client_id": str(failure.get("client_id", "?")),
                        "stage": str(failure.get("stage", "?")),
                        "reason": reason,
                    }
                )

    def on_run_end(self, engine: Engine, history: History) -> None:
        with self._lock:
            self._status = "finished"

    def snapshot(self) -> dict[str, Any]:
        """The state as the JSON endpoint sends it."""
        clients = sorted(self.client_manager.all())
        with self._lock:
            rounds = list(self._rounds)
            done = rounds[-1]["round"] if rounds else 0
            return {
                "status": self._status,
                "description": self.description,
                "rounds_total": self.rounds_total,
                "rounds_done": done,
                "current_round": done + 1 if self._status == "running" else done,
                "model_version": rounds[-1]["model_version"] if rounds else None,
                "clients": clients,
                "num_clients": len(clients),
                "rounds": rounds,
                "failures": list(self._failures),
                "failures_total": self._totals["failures"],
                "bytes_up_total": self._totals["bytes_up"],
                "bytes_down_total": self._totals["bytes_down"],
                "epsilon": self._epsilon,
                "uptime_s": time.time() - self._started,
            }


#: The page's files and their types (the page loads nothing else).
_STATIC = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def _static(name: str) -> bytes:
    return files("fedhive.server").joinpath("dashboard_static", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    server_version = "fedhive-dashboard"
    sys_version = ""

    def _allowed(self) -> bool:
        """Whether the request carries credentials the access rule takes (else 401)."""
        if self.server.access.allows(self.headers.get("Authorization")):
            return True
        self._send(401, b"log in with an enrolled node id and its token\n", "text/plain", {
            "WWW-Authenticate": 'Basic realm="fedhive server", charset="UTF-8"'
        })  # fmt: skip
        return False

    def do_GET(self) -> None:
        if not self._allowed():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/state":
            body = json.dumps(self.server.state.snapshot(), allow_nan=False).encode()
            self._send(200, body, "application/json")
        elif path in _STATIC:
            name, kind = _STATIC[path]
            self._send(200, _static(name), kind)
        else:
            self._send(404, b"not found\n", "text/plain")

    def _refuse(self) -> None:
        if self._allowed():
            self._send(405, b"read-only: GET only\n", "text/plain", {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _send(
        self, code: int, body: bytes, kind: str, extra: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(code)
        for key, value in {**_HEADERS, **(extra or {}), "Content-Type": kind}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the page polls every second."""


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, state: LiveState, access: DashboardAccess) -> None:
        self.address_family = _family(host)
        super().__init__((host, port), _Handler)
        self.state = state
        self.access = access

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A request that broke off (a failed TLS handshake, a closed connection) is the
        asker's problem: logged at debug level, no traceback on the server's console."""
        log.debug("dashboard request from %s failed", client_address, exc_info=True)


def _family(host: str) -> Any:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Dashboard:
    """The page of ``state`` served on ``address`` from a daemon thread (``start`` /
    ``stop``, or a ``with`` block). ``access`` defaults to :func:`dashboard_access` of
    the address without tokens (so an exposed address is refused); ``tls`` is ``(cert
    file, key file)`` for HTTPS."""

    def __init__(
        self,
        address: str,
        state: LiveState,
        access: DashboardAccess | None = None,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.state = state
        self.access = access if access is not None else dashboard_access(self.host, None)
        self.tls = tls
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Dashboard:
        try:
            server = _HttpServer(self.host, self.port, self.state, self.access)
        except OSError as exc:
            raise ConfigError(f"--dashboard {self.host}:{self.port}: {exc.strerror}") from None
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            # the handshake happens in the request's thread, not in the accepting one
            server.socket = context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, name="fedhive-dashboard", daemon=True
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
