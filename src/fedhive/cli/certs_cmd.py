"""``fedhive certs``: a CA and the server's and each site's certificates for a test
federation (EC P-256, signed with SHA-256; private keys written with mode 0600)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedhive.cli.deploy_common import err
from fedhive.common.errors import ConfigError, FedhiveError, MissingDependency

__all__ = ["certs", "make_certificates"]


def _write(path: Path, data: bytes, private: bool) -> None:
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # also when the file existed with other bits


def make_certificates(
    out: Path,
    *,
    hosts: tuple[str, ...] = (),
    clients: tuple[str, ...] = ("site-0", "site-1"),
    days: int = 30,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (valid for localhost,
    127.0.0.1 and ``hosts``) and ``NAME.pem``/``NAME.key`` per client to ``out``; the
    paths written. Refuses to replace existing files unless ``overwrite``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as exc:  # pragma: no cover - the grpc extra installs it
        raise MissingDependency("cryptography", "grpc") from exc
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    names = ["ca", "server", *clients]
    if len(set(names)) != len(names):
        raise ConfigError(f"client names must differ from each other and from ca/server: {names}")
    paths = [out / f"{n}.{ext}" for n in names for ext in ("pem", "key")]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} exist already; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def issue(
        cn: str, issuer: Any = None, issuer_key: Any = None, san: tuple[str, ...] = ()
    ) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer is not None else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(
                x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True
            )
        )
        if san:
            alt: list[x509.GeneralName] = []
            for host in san:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())
        return cert, key

    def save(name: str, cert: Any, key: Any) -> None:
        _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), False)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(out / f"{name}.key", pem, True)

    ca, ca_key = issue("fedhive test CA")
    save("ca", ca, ca_key)
    server_hosts = tuple(dict.fromkeys(("localhost", "127.0.0.1", *hosts)))
    save("server", *issue("fedhive server", ca, ca_key, server_hosts))
    for client in clients:
        save(client, *issue(client, ca, ca_key))
    return paths


def certs(
    out: Annotated[Path, typer.Argument(help="folder to write to")] = Path("certs"),
    host: Annotated[
        list[str] | None,
        typer.Option(help="a name or IP the clients use for the server (repeatable)"),
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option(
            help="a site's name: NAME.pem and NAME.key (repeatable; default site-0, site-1)"
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="days the certificates are valid")] = 30,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing files")] = False,
) -> None:
    """Make test certificates: a CA, the server's (for localhost, 127.0.0.1 and each
    --host) and one per site, for TLS and mutual TLS. Keys are written with mode 0600.

    Keep ca.key private: whoever holds it can issue certificates the server accepts. In
    production, use your organisation's CA.
    """
    sites = tuple(client) if client else ("site-0", "site-1")
    try:
        paths = make_certificates(
            out, hosts=tuple(host or ()), clients=sites, days=days, overwrite=overwrite
        )
    except FedhiveError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    err.print(f"wrote {', '.join(p.name for p in paths)} to {out}", highlight=False, markup=False)
    site = sites[0]
    err.print(
        f"server: fedhive server --ca {out}/ca.pem --cert {out}/server.pem --key "
        f"{out}/server.key [--require-client-auth]\n"
        f"site:   fedhive client --server localhost:8080 --root-certificates {out}/ca.pem "
        f"[--cert {out}/{site}.pem --key {out}/{site}.key] ...",
        highlight=False,
        markup=False,
    )
