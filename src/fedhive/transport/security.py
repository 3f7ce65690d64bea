"""TLS and client authentication of the gRPC server (and its data plane)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from fedhive.common.errors import TransportError

__all__ = ["ServerSecurity"]


@dataclass(frozen=True)
class ServerSecurity:
    """TLS and client authentication for :class:`GrpcServer`.

    ``certificates`` is Flower's triple ``(ca_cert, server_cert, server_key)`` (PEM bytes);
    ``require_client_auth`` turns on mutual TLS (clients present certificates signed by
    ``ca_cert``). ``tokens`` enrolls clients: ``node_id -> secret``; when given, a client
    must present its node id and token in its HELLO. With mutual TLS, a client's node id
    must be one its certificate names (its common name or a subject alternative name), so
    one certified site cannot claim another's id, not even with that site's token; with
    tokens, this holds for certificates that name an enrolled node (a per-site
    certificate), while a certificate naming none (one shared by all members) proves
    membership only and the token says which node.
    """

    certificates: tuple[bytes, bytes, bytes] | None = None
    require_client_auth: bool = False
    tokens: Mapping[str, str] | None = None

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.certificates is None:
            if self.require_client_auth:
                raise TransportError("mutual TLS needs certificates=(ca, cert, key)")
            return None
        ca, cert, key = self.certificates
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=ca if self.require_client_auth else None,
            require_client_auth=self.require_client_auth,
        )
