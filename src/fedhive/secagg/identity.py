"""Enrolled SecAgg+ identities: a site's Ed25519 key on disk, and the keys of its peers.

Without enrollment a SecAgg+ client trusts the identity keys the server relays, so a
server that swaps keys can sit in the middle of the pairwise key agreements. With it,
every site keeps one long-term identity key (:func:`write_identity`, or
``fedhive secagg keygen``) and all sites share, out of band, a peers file that maps node
ids to public identity keys::

    [identities]
    "hospital-a" = "base64 of the raw 32-byte Ed25519 public key"
    "hospital-b" = "..."

A client given both (:func:`enrolled_mod`, or ``fedhive client --secagg-identity KEY
--secagg-peers PEERS``) accepts a peer's round keys only when they are signed by the key
enrolled for that peer, and refuses a round with any peer that is not enrolled.
Identity keys are stored as unencrypted PKCS#8 PEM (what ``openssl genpkey -algorithm
ed25519`` writes), readable by their owner only.
"""

from __future__ import annotations

import base64
import binascii
import tomllib
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhive.common.atomic import atomic_write_bytes
from fedhive.common.errors import ConfigError
from fedhive.secagg import primitives as p
from fedhive.secagg.client import SecAggPlusMod

__all__ = [
    "enrolled_mod",
    "format_peer",
    "load_identity",
    "load_peers",
    "public_key_text",
    "write_identity",
]


def write_identity(path: str | Path, *, overwrite: bool = False) -> bytes:
    """Make a new identity key at ``path`` (mode 0600); returns its raw public key."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; refusing to replace an identity key")
    secret = p.new_identity()
    pem = Ed25519PrivateKey.from_private_bytes(secret).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # owner-only from its first byte; replaces a link at ``path`` rather than writing through it
    atomic_write_bytes(path, pem, mode=0o600)
    return p.identity_public(secret)


def load_identity(path: str | Path) -> bytes:
    """The raw 32-byte Ed25519 secret of the PEM key file at ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read identity key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_key_text(public: bytes) -> str:
    """A raw public key as the peers file writes it (base64)."""
    return base64.b64encode(public).decode("ascii")


def format_peer(node_id: str, public: bytes) -> str:
    """The peers-file line that enrolls ``node_id``."""
    escaped = node_id.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" = "{public_key_text(public)}"'


def load_peers(path: str | Path) -> dict[str, bytes]:
    """The ``[identities]`` table of a peers file: node id -> raw public key."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read peers file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"peers file {path} is not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"identities"})
    if extra:
        raise ConfigError(f"peers file {path}: unknown table or key {extra[0]!r}")
    table = data.get("identities")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"peers file {path} has no [identities] table")
    peers = {}
    for node, text in table.items():
        if not isinstance(text, str):
            raise ConfigError(f"peers file {path}: {node!r} must map to a base64 string")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"peers file {path}: the key of {node!r} is not base64") from None
        if len(raw) != 32:
            raise ConfigError(
                f"peers file {path}: the key of {node!r} has {len(raw)} bytes, not 32"
            )
        peers[node] = raw
    return peers


def enrolled_mod(
    identity: bytes, peers: Mapping[str, bytes], node_id: str | None = None
) -> SecAggPlusMod:
    """The SecAgg+ client mod of a site with ``identity`` (raw secret) and ``peers``.

    With ``node_id``, checks that this site is enrolled in ``peers`` under its own key,
    so a site with the wrong key file fails at start rather than in its first round.
    """
    if node_id is not None:
        enrolled = peers.get(node_id)
        if enrolled is None:
            raise ConfigError(f"node {node_id!r} is not in the peers file")
        if enrolled != p.identity_public(identity):
            raise ConfigError(
                f"the identity key given is not the one enrolled for node {node_id!r}"
            )
    return SecAggPlusMod(trusted_identities=peers, identity=identity)
