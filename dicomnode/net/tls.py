"""TLS contexts for DICOM (PS3.15 B.1 and the BCP 195 profile): TLS 1.2 or newer, both directions."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_ssl_context(certificate: Path, private_key: Path, ca_certificates: Path | None) -> ssl.SSLContext:
    """A server-side TLS context: TLS 1.2 or newer, our certificate, and client certificates
    required when a CA (``ca_certificates``) is given."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if ca_certificates is not None:
        context.load_verify_locations(ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(
    ca_certificates: Path | None, certificate: Path | None = None, private_key: Path | None = None
) -> ssl.SSLContext:
    """TLS 1.2+ towards a peer, verifying its certificate (and host name) against ``ca_certificates``
    (the system's trust store when None), presenting ``certificate`` when the peer asks for one."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_certificates) if ca_certificates else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate is not None and private_key is not None:
        context.load_cert_chain(certificate, private_key)
    return context
