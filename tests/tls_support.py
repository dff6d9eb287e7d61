"""A small PKI for the TLS tests, made with the ``cryptography`` package: nothing is checked in.

:func:`make_pki` writes into a directory:

* ``ca.pem``: the CA the broker trusts (``BROKER_TLS_CA_BUNDLE``);
* ``server.pem`` / ``server.key``: the broker's certificate (CN=localhost, SAN localhost and 127.0.0.1),
  also used by test peers (a UPS subscriber, a RIS, a syslog server) since they run on localhost too;
* ``client.pem`` / ``client.key``: a modality's certificate from that CA (CN=ct01.example.test);
* ``other-client.pem`` / ``other-client.key``: a second one from the same CA (CN=mr01.example.test);
* ``expired.pem`` / ``expired.key``: from that CA, but its validity ended yesterday;
* ``rogue-ca.pem``, ``rogue.pem`` / ``rogue.key``: a certificate from a CA the broker does not trust.

The ``pki`` fixture of ``tests/conftest.py`` makes one per test session.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """Paths of the files :func:`make_pki` wrote."""

    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    @property
    def server_cert(self) -> str:
        return self.path("server.pem")

    @property
    def server_key(self) -> str:
        return self.path("server.key")

    @property
    def client_cert(self) -> str:
        return self.path("client.pem")

    @property
    def client_key(self) -> str:
        return self.path("client.key")

    def fingerprint(self, name: str) -> str:
        """The SHA-256 fingerprint (hex, lower case) of the certificate ``name`` (e.g. ``client.pem``)."""
        certificate = x509.load_pem_x509_certificate((self.directory / name).read_bytes())
        return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    def broker_env(self) -> dict[str, str]:
        """The settings that give the broker this PKI's server certificate, key and CA."""
        return {"BROKER_TLS_CERTIFICATE": self.server_cert, "BROKER_TLS_PRIVATE_KEY": self.server_key,
                "BROKER_TLS_CA_BUNDLE": self.ca}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Broker tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(certificate: x509.Certificate, path: Path) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _ca(common_name: str, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    certificate = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
    return certificate, key


def _leaf(common_name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
          not_before: datetime.datetime, not_after: datetime.datetime,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    ca_certificate, ca_key = issuer
    names: list[x509.GeneralName] = [x509.DNSName(common_name)]
    if common_name == "localhost":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (x509.CertificateBuilder().subject_name(_name(common_name))
                   .issuer_name(ca_certificate.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    return certificate, key


def make_pki(directory: Path) -> Pki:
    """Write the CA, the broker's, the clients' and the bad certificates into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=365))
    ca = _ca("Broker test CA", now)
    _write_cert(ca[0], directory / "ca.pem")
    for stem, common_name, window in (
            ("server", "localhost", valid),
            ("client", "ct01.example.test", valid),
            ("other-client", "mr01.example.test", valid),
            ("expired", "old01.example.test", (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)))):
        certificate, key = _leaf(common_name, ca, *window)
        _write_cert(certificate, directory / f"{stem}.pem")
        _write_key(key, directory / f"{stem}.key")
    rogue_ca = _ca("Rogue CA", now)
    _write_cert(rogue_ca[0], directory / "rogue-ca.pem")
    certificate, key = _leaf("rogue.example.test", rogue_ca, *valid)
    _write_cert(certificate, directory / "rogue.pem")
    _write_key(key, directory / "rogue.key")
    return Pki(directory)
