"""TLS for the server: certificate, key and (for mutual TLS) the CA that client certificates must chain to,
read from PEM files, and reloadable.

The credentials are gRPC's dynamic ones: gRPC asks `CertificateSource.fetch` for a new configuration at
each new handshake, so `reload()` (SIGHUP) takes effect for new connections while the connections already
open, and the streams on them, go on undisturbed. A reload that cannot read the files keeps the current
ones in force and says why.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("sinkstream.tls")


class TLSFileError(ValueError):
    """A PEM file that cannot be used."""


@dataclass(frozen=True)
class TLSFiles:
    """Where the server's PEM files are. client_ca set: clients must present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def _read_pem(path: Path, what: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSFileError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or marker not in data:
        raise TLSFileError(f"{what} {str(path)!r} is not a PEM file holding a {marker.decode()}")
    return data


def _certificate_configuration(files: TLSFiles) -> grpc.ServerCertificateConfiguration:
    cert = _read_pem(files.cert, "--tls-cert", b"CERTIFICATE")
    key = _read_pem(files.key, "--tls-key", b"PRIVATE KEY")
    ca = _read_pem(files.client_ca, "--tls-client-ca", b"CERTIFICATE") if files.client_ca else None
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class CertificateSource:
    """The server's certificate configuration, handed to gRPC at handshakes; reloadable."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._lock = threading.Lock()  # gRPC calls fetch from its own threads
        self._initial = _certificate_configuration(files)  # TLSFileError now, not at the first handshake
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that take up reloaded files at the next handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self.files.client_ca is not None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback: the configuration reloaded since the last call, None for no change."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> bool:
        """Read the files again for the next handshakes; on a problem keep the current ones and log why."""
        try:
            configuration = _certificate_configuration(self.files)
        except TLSFileError as exc:
            log.error("certificates not reloaded, the previous ones stay in force: %s", exc)
            return False
        with self._lock:
            self._pending = configuration
        log.info("certificates reloaded", extra={"cert": str(self.files.cert)})
        return True
