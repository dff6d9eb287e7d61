"""Who may associate: an optional allow-list of calling AE titles, each optionally bound to a host, and
AE titles bound to a client certificate.

Checked when the A-ASSOCIATE-RQ arrives (the calling AE title is known only then); a caller refused
gets A-ASSOCIATE-RJ "calling AE title not recognized" (rejected-permanent, service-user).

An AE title is only a name any modality can send; a title bound to a certificate
(``dicom_tls_ae_certificates``) is accepted only on a TLS connection whose client presented that
certificate (by SHA-256 fingerprint or common name), so that a stolen AE title alone does not get in.
Titles not bound follow the allow-list alone, on either port.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from broker.tls import PeerCertificate, certificate_matches


@dataclass(frozen=True)
class Channel:
    """How an association reached the broker: over TLS or not, and the client certificate it showed."""

    tls: bool = False
    certificate: PeerCertificate | None = None


PLAIN = Channel()
"""A connection on the plain DICOM port."""


@dataclass(frozen=True)
class CallerPolicy:
    """The allow-list and the certificate bindings; empty ``entries`` lets every caller in.

    ``entries`` maps a calling AE title to the set of addresses it may come from; an empty set means
    from anywhere. ``bindings`` maps an AE title to the certificate it must present,
    ``("sha256", hex)`` or ``("cn", name)`` (:attr:`broker.config.Settings.ae_certificates`).
    """

    entries: dict[str, frozenset[str]]
    bindings: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]],
                   bindings: dict[str, tuple[str, str]] | None = None) -> CallerPolicy:
        """Build from (AE title, host) pairs; host names are resolved to their addresses now."""
        entries: dict[str, set[str]] = {}
        anywhere: set[str] = set()
        for title, host in pairs:
            addresses = entries.setdefault(title.strip(), set())
            if not host:
                anywhere.add(title.strip())
            else:
                addresses.update(_addresses_of(host))
        return cls({title: frozenset() if title in anywhere else frozenset(addresses)
                    for title, addresses in entries.items()},
                   {title.strip(): binding for title, binding in (bindings or {}).items()})

    @property
    def open(self) -> bool:
        """True when no allow-list is configured."""
        return not self.entries

    def allows(self, calling_ae_title: str, address: str) -> bool:
        """Whether ``calling_ae_title`` connecting from ``address`` is on the allow-list."""
        if self.open:
            return True
        addresses = self.entries.get(calling_ae_title.strip())
        if addresses is None:
            return False
        return not addresses or address in addresses

    def refusal(self, calling_ae_title: str, address: str, channel: Channel = PLAIN) -> str | None:
        """None when ``calling_ae_title`` from ``address`` on ``channel`` may associate, else why not
        (for the log line and the Security Alert; it names no certificate's content)."""
        binding = self.bindings.get(calling_ae_title.strip())
        if binding is not None:
            if not channel.tls:
                return "calling AE title bound to a certificate, association not over TLS"
            if channel.certificate is None:
                return "calling AE title bound to a certificate, none presented"
            if not certificate_matches(channel.certificate, binding):
                return "calling AE title bound to another certificate"
        if not self.allows(calling_ae_title, address):
            return "calling AE title not on the allow-list"
        return None


def _addresses_of(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return {host}  # an unresolvable name still matches a caller that shows exactly this text
