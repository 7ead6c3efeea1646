"""How a client reaches a server: a plaintext or TLS channel (mutual TLS with a client certificate), and
the bearer token sent as `authorization: Bearer TOKEN` metadata on every call."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

Pem = str | os.PathLike | bytes  # a PEM file's path, or its contents
Metadata = tuple[tuple[str, str], ...]


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {os.fspath(value)!r}: {exc.strerror or exc}") from exc


def channel_credentials(tls_ca: Pem | None = None, tls_cert: Pem | None = None,
                        tls_key: Pem | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: the server's certificate must chain to `tls_ca` (None: the system's roots);
    `tls_cert` and `tls_key`: this client's certificate for mutual TLS (both or neither)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key: give tls_cert and tls_key together")
    return grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca, "TLS CA"),
                                        private_key=_pem(tls_key, "TLS key"),
                                        certificate_chain=_pem(tls_cert, "TLS certificate"))


def open_channel(address: str, options: list, *, tls: bool = False, tls_ca: Pem | None = None,
                 tls_cert: Pem | None = None, tls_key: Pem | None = None, aio: bool = False):
    """A channel to `address` (grpc.Channel, or grpc.aio.Channel if `aio`): TLS if `tls` or any TLS file
    is given, plaintext otherwise."""
    module = grpc.aio if aio else grpc
    if tls or tls_ca is not None or tls_cert is not None:
        return module.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
    return module.insecure_channel(address, options=options)


def auth_metadata(token: str | None) -> Metadata:
    """The metadata every call carries: the bearer token, if any."""
    if token is None:
        return ()
    if not token or any(c.isspace() for c in token):
        raise ValueError("a token is one word without spaces")
    return (("authorization", f"Bearer {token}"),)
