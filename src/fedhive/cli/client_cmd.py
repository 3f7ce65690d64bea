"""``fedhive client``: connect one site to a server with your client (``--app``) or the
built-in demo client (``--demo``), and answer its tasks until the run ends."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedhive.cli.demo_client import demo_client_fn
from fedhive.cli.deploy_common import err, read_file, set_log_level
from fedhive.common.errors import ConfigError, FedhiveError

__all__ = ["client", "client_target", "load_app"]

_CLIENT_NEEDS_TLS = (
    "fedhive client requires TLS: give --root-certificates CA.pem (the CA that signed the "
    "server's certificate); pass --insecure to connect without encryption (for tests on one "
    "machine only)"
)


class _Tally:
    """A client mod that counts this site's tasks and those that failed (an exception,
    or an error reply), so that a site none of whose tasks succeeded exits non-zero."""

    def __init__(self) -> None:
        self.tasks = 0
        self.failed = 0

    def __call__(self, message: Any, context: Any, call_next: Any) -> Any:
        self.tasks += 1
        try:
            reply = call_next(message, context)
        except Exception:
            self.failed += 1
            raise
        if getattr(reply, "error", None) is not None:
            self.failed += 1
        return reply

    def all_failed(self) -> bool:
        return self.tasks > 0 and self.failed == self.tasks


def load_app(spec: str, app_dir: str) -> Any:
    """``module:attr`` (attr may be dotted) imported with ``app_dir`` on ``sys.path``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"--app expects MODULE:ATTRIBUTE (e.g. my_client:client_fn), got {spec!r}"
        )
    folder = str(Path(app_dir).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--app {spec}: cannot import module {module_name!r} (searched {folder} and "
            f"sys.path): {exc}"
        ) from exc
    _check_not_shadowed(obj, module_name, Path(folder), spec)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"--app {spec}: {module_name!r} has no attribute {attr!r}") from None
    return obj


def _check_not_shadowed(module: Any, module_name: str, folder: Path, spec: str) -> None:
    """A file in the app folder under the name of a module Python imported elsewhere
    first (``site.py``, ``test.py``, an installed package) is not the one imported."""
    top = module_name.split(".")[0]
    mine = [p for p in (folder / f"{top}.py", folder / top / "__init__.py") if p.exists()]
    loaded = getattr(sys.modules.get(top), "__file__", None)
    if mine and loaded and Path(loaded).resolve() != mine[0].resolve():
        raise ConfigError(
            f"--app {spec}: {top!r} was imported from {loaded}, not {mine[0]}: Python or an "
            f"installed package already has a module of that name; rename your file"
        )


def client_target(obj: Any, spec: str) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """``start_client`` arguments for an ``--app`` object, and the app's own mods."""
    from fedhive.client.app import ClientApp
    from fedhive.client.client import Client
    from fedhive.client.numpy_client import NumPyClient

    if isinstance(obj, ClientApp):
        return {"client_fn": obj.client_fn}, obj.mods
    if isinstance(obj, NumPyClient):
        return {"client": obj.to_client()}, ()
    if isinstance(obj, Client):
        return {"client": obj}, ()
    if callable(obj):
        return {"client_fn": obj}, ()
    raise ConfigError(
        f"--app {spec}: expected a client_fn (taking a Context or a cid), a NumPyClient or "
        f"Client instance, or a ClientApp; got {type(obj).__name__}"
    )


def _token(token: str | None, token_file: Path | None) -> str:
    if token and token_file is not None:
        raise ConfigError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            value = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
        if not value:
            raise ConfigError(f"--token-file {token_file} is empty")
        return value
    return token or ""


def _check_tls_flags(
    insecure: bool, root_certificates: Path | None, cert: Path | None, key: Path | None
) -> None:
    """Refuse a connection without TLS unless ``--insecure``, and contradictory flags."""
    if insecure and (root_certificates is not None or cert is not None):
        raise ConfigError("--insecure contradicts --root-certificates/--cert; drop one")
    if not insecure and root_certificates is None:
        raise ConfigError(_CLIENT_NEEDS_TLS)
    if (cert is None) != (key is None):
        raise ConfigError("mutual TLS needs both --cert and --key")


def _state_node(state_dir: Path, node_id: str | None) -> str:
    """This site's node id (``--node-id``, else the one kept in ``--state-dir``), after
    checking that the state folder can be made and written."""
    from fedhive.client.start import node_id_in

    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"--state-dir {state_dir} is a file, not a folder")
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return node_id or node_id_in(state_dir)
    except OSError as exc:
        raise ConfigError(f"--state-dir {state_dir}: {exc.strerror or exc}") from exc


def _secagg_mods(identity: Path | None, peers: Path | None, node_id: str | None) -> list[Any]:
    """The enrolled SecAgg+ mod, when --secagg-identity and --secagg-peers are given."""
    if identity is None and peers is None:
        return []
    if identity is None or peers is None or not node_id:
        raise ConfigError("--secagg-identity and --secagg-peers go together, with --node-id")
    from fedhive.secagg.identity import enrolled_mod, load_identity, load_peers

    return [enrolled_mod(load_identity(identity), load_peers(peers), node_id)]


def client(
    server: Annotated[str, typer.Option("--server", help="the server's HOST:PORT")],
    app: Annotated[
        str | None,
        typer.Option(help="your client: MODULE:ATTR, a client_fn, NumPyClient or ClientApp"),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="run the built-in demo client instead of --app")
    ] = False,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="connect WITHOUT TLS (tests on one machine only)")
    ] = False,
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA certificate (PEM) that signed the server's")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="this client's certificate (PEM), for mutual TLS")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="this client's private key (PEM), for mutual TLS")
    ] = None,
    node_id: Annotated[
        str | None, typer.Option(help="this site's node id (default: random)")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="FEDHIVE_TOKEN", help="the token enrolled for this node id"),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="read the token from this file instead")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="site policy (TOML): allowed config keys, epochs, metrics")
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option(help="append a JSON line per message that leaves this site")
    ] = None,
    secagg_identity: Annotated[
        Path | None,
        typer.Option(
            help="this site's SecAgg+ identity key (fedhive secagg keygen); needs "
            "--secagg-peers and --node-id"
        ),
    ] = None,
    secagg_peers: Annotated[
        Path | None,
        typer.Option(help="the enrolled identity keys of all sites (TOML [identities])"),
    ] = None,
    persistent: Annotated[
        bool, typer.Option("--persistent", help="stay up after a run and join the next one")
    ] = False,
    no_data_plane: Annotated[
        bool,
        typer.Option(
            "--no-data-plane",
            help="keep every message on the gRPC port (default: large ones use the server's "
            "data port when it is reachable)",
        ),
    ] = False,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="keep this site's state (personal layers and models, error-feedback "
            "residuals, SCAFFOLD's variate) in this folder across restarts, with its node "
            "id unless --node-id is given"
        ),
    ] = None,
    max_retries: Annotated[
        int | None, typer.Option(help="reconnection attempts (default: unlimited)")
    ] = None,
    max_wait_time: Annotated[
        float | None, typer.Option(help="seconds to keep reconnecting (default: unlimited)")
    ] = None,
    app_dir: Annotated[str, typer.Option(help="folder to import --app from")] = ".",
    partition_id: Annotated[int, typer.Option(help="demo: this client's partition")] = 0,
    num_partitions: Annotated[int, typer.Option(help="demo: number of partitions")] = 2,
    dataset: Annotated[str, typer.Option(help="demo: mnist1d|digits|synthetic")] = "mnist1d",
    num_samples: Annotated[int, typer.Option(help="demo: MNIST-1D samples")] = 20_000,
    partition: Annotated[
        str, typer.Option(help="demo: iid|dirichlet|shards|quantity_skew")
    ] = "dirichlet",
    alpha: Annotated[float, typer.Option(help="demo: Dirichlet concentration")] = 0.5,
    val_fraction: Annotated[
        float, typer.Option(help="demo: share of the partition kept for evaluation")
    ] = 0.1,
    model: Annotated[str, typer.Option(help="demo: cnn1d|mlp|logreg")] = "cnn1d",
    hidden: Annotated[int, typer.Option(help="demo: hidden width of the MLP")] = 128,
    seed: Annotated[
        int, typer.Option(help="demo: seed of the data and partition (same on every site)")
    ] = 0,
    log_level: Annotated[str, typer.Option(help="debug|info|warning|error")] = "info",
) -> None:
    """Connect this site to a fedhive server and answer its tasks until the run ends.

    Runs your client (--app MODULE:ATTR) or the built-in demo client (--demo), which
    trains a reference model on its own partition of a built-in data set. Requires TLS
    (--root-certificates CA.pem) unless --insecure is given. Exits 1 if every task it
    received failed, 2 on a refusal or a connection that could not be (re)made.
    """
    tally = _Tally()
    try:
        if demo == (app is not None):
            raise ConfigError("give exactly one of --app MODULE:ATTR or --demo")
        _check_tls_flags(insecure, root_certificates, cert, key)
        secret = _token(token, token_file)
        if state_dir is not None:
            node_id = _state_node(state_dir, node_id)
        mods: list[Any] = _secagg_mods(secagg_identity, secagg_peers, node_id)
        if policy is not None:
            from fedhive.client.policy import SitePolicy, policy_mod

            mods.append(policy_mod(SitePolicy.from_file(policy)))
        if app is not None:
            target, app_mods = client_target(load_app(app, app_dir), app)
            mods.extend(app_mods)
            what = f"--app {app}"
        else:
            from fedhive.cli.strategies import required_client_mods

            fn, what = demo_client_fn(
                partition_id=partition_id,
                num_partitions=num_partitions,
                dataset=dataset,
                num_samples=num_samples,
                partition=partition,
                alpha=alpha,
                val_fraction=val_fraction,
                model=model,
                hidden=hidden,
                seed=seed,
            )
            target = {"client_fn": fn}
            # The demo client does not know the server's strategy: it installs the mods
            # every registered strategy requires (each acts on its own rounds only).
            mods.extend(required_client_mods())
        mods.insert(0, tally)  # before the site's mods: it sees their failures too
        tls: dict[str, Any] = {}
        if cert is not None and key is not None:
            tls = {
                "certificate_chain": read_file(str(cert), "--cert"),
                "private_key": read_file(str(key), "--key"),
            }
        roots = (
            read_file(str(root_certificates), "--root-certificates") if root_certificates else None
        )
        set_log_level(log_level)
        err.print(
            f"fedhive client: {what} -> {server} ({'INSECURE' if insecure else 'TLS'})",
            highlight=False,
            markup=False,
        )
        from fedhive.client.start import start_client

        start_client(
            server_address=server,
            root_certificates=roots,
            insecure=insecure,
            max_retries=max_retries,
            max_wait_time=max_wait_time,
            node_id=node_id,
            auth_token=secret,
            mods=mods,
            persistent=persistent,
            audit_log=audit_log,
            state_dir=state_dir,
            data_plane=not no_data_plane,
            **tls,
            **target,
        )
    except FedhiveError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("\ninterrupted", highlight=False, markup=False)
        raise typer.Exit(130) from None
    if tally.all_failed():
        err.print(
            f"[bold red]error:[/] every one of this site's {tally.tasks} tasks failed "
            "(the reasons are above)",
            highlight=False,
        )
        raise typer.Exit(1)
    raise typer.Exit(0)
