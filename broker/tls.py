"""TLS for every listener and for the connections the broker opens: one certificate, key and CA bundle.

The profile is DICOM PS3.15 Annex B's BCP 195 profile (B.9): TLS 1.2 and 1.3 only, TLS 1.2 with the
forward-secret AEAD suites of ``tls_ciphers``, no compression, no renegotiation. Each listener builds
its context with :func:`server_context` (the only difference between listeners is whether a client
certificate is required); the broker's own connections (UPS event reports, Storage Commitment, the RIS,
the audit repository) use :func:`client_context`, which verifies the peer against the CA bundle and
presents the broker's certificate, so a peer that requires mutual TLS accepts it.

The handshake itself is done where the connection is served (the association's or the MLLP
connection's thread), never in an accept loop: a client that stalls or fails it costs only its own
connection. :func:`handshake_failure` turns the exception into the short reason that is logged and
audited.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Any

from broker.config import Settings


def server_context(settings: Settings, *, require_client_cert: bool) -> ssl.SSLContext:
    """A context for a listener: the broker's certificate; clients verified against the CA bundle.

    ``require_client_cert``: a client without a certificate issued by a CA of ``tls_ca_bundle`` is
    refused in the handshake (mutual TLS). Otherwise a certificate is still asked for and verified
    when offered, so that an AE title bound to a certificate can be checked on any TLS port.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_profile(context, settings)
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_bundle:
        context.load_verify_locations(cafile=settings.tls_ca_bundle)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ValueError("a client certificate can only be required with a CA bundle")
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """A context for a connection the broker opens: the peer verified, the broker's certificate shown."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_profile(context, settings)
    context.load_verify_locations(cafile=settings.tls_ca_bundle)
    context.check_hostname = settings.tls_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.tls_certificate and settings.tls_private_key:
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    return context


def _apply_profile(context: ssl.SSLContext, settings: Settings) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(settings.tls_ciphers)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


@dataclass(frozen=True)
class PeerCertificate:
    """What identifies the certificate a peer presented: its SHA-256 fingerprint and subject."""

    sha256: str
    """Lower-case hex without colons (what ``openssl x509 -fingerprint -sha256`` prints, normalised)."""
    common_name: str
    subject: str
    """The subject as ``CN=...,O=...`` (RFC 4514 order is not promised; for logs and audit records)."""


def peer_certificate(connection: ssl.SSLSocket | ssl.SSLObject) -> PeerCertificate | None:
    """The verified certificate the peer presented, or None when it presented none."""
    der = connection.getpeercert(binary_form=True)
    if not der:
        return None
    decoded: dict[str, Any] = dict(connection.getpeercert() or {})
    names = [(str(key), str(value)) for rdn in decoded.get("subject", ()) for key, value in rdn]
    common_name = next((value for key, value in names if key == "commonName"), "")
    subject = ",".join(f"{_SHORT_NAMES.get(key, key)}={value}" for key, value in names)
    return PeerCertificate(hashlib.sha256(der).hexdigest(), common_name, subject)


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}


def certificate_matches(certificate: PeerCertificate | None, binding: tuple[str, str]) -> bool:
    """True if ``certificate`` is the one ``binding`` (``("sha256", hex)`` or ``("cn", name)``) names."""
    if certificate is None:
        return False
    kind, expected = binding
    if kind == "sha256":
        return certificate.sha256 == expected
    return certificate.common_name == expected


def handshake_failure(exc: BaseException) -> str:
    """A short reason for a failed handshake, for the log line and the audit record (no secrets in it)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "handshake not completed in time"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
