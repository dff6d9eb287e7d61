"""Audit messages as syslog: RFC 5424 messages, framed for TLS (RFC 5425) or sent as datagrams (RFC 5426).

The header follows what IHE ATNA asks of an audit message: facility authpriv (10), APP-NAME the
broker, MSGID ``IHE+RFC-3881``, no structured data, and the XML as MSG after a UTF-8 BOM (RFC 5424
6.4: a MSG in UTF-8 starts with the BOM). Severity is notice for a success and warning for any failure
outcome, so that a repository's filters can pick the failures.
"""

from __future__ import annotations

import socket
import ssl
from datetime import datetime

from broker.audit.xml import event_datetime

AUTHPRIV = 10
NOTICE, WARNING = 5, 4
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
MAX_DATAGRAM = 65_507
"""The largest UDP payload over IPv4; a bigger message cannot go over UDP (RFC 5426 3.2)."""


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, ``-`` when empty (RFC 5424 6.2)."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def message(xml: str, *, when: datetime, hostname: str, app_name: str, procid: str, failed: bool) -> bytes:
    """One RFC 5424 syslog message carrying ``xml``."""
    pri = AUTHPRIV * 8 + (WARNING if failed else NOTICE)
    header = (f"<{pri}>1 {event_datetime(when)} {_header_field(hostname, 255)} {_header_field(app_name, 48)} "
              f"{_header_field(procid, 128)} {MSGID} - ")
    return header.encode("ascii") + BOM + xml.encode("utf-8")


def octet_counted(syslog_message: bytes) -> bytes:
    """RFC 5425 (and RFC 6587 3.4.1) framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(syslog_message)).encode("ascii") + b" " + syslog_message


class TlsSender:
    """One persistent TLS connection to the repository, opened on first use and after a failure."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
        self._address = (host, port)
        self._context = context
        self._timeout = timeout
        self._sock: ssl.SSLSocket | None = None

    def _connected(self) -> ssl.SSLSocket:
        if self._sock is not None and not self._peer_closed(self._sock):
            return self._sock
        self.close()
        raw = socket.create_connection(self._address, timeout=self._timeout)
        try:
            self._sock = self._context.wrap_socket(raw, server_hostname=self._address[0])
        except BaseException:
            raw.close()
            raise
        return self._sock

    @staticmethod
    def _peer_closed(sock: ssl.SSLSocket) -> bool:
        """Whether the repository closed the connection since the last send.

        Syslog has no acknowledgement: a write into a connection the peer has closed still succeeds
        once, and that batch would be lost. Looking for the peer's close before each batch catches a
        repository that stopped or restarted in between; a connection that breaks during a send fails
        it, and the batch is sent again (at least once).
        """
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            sock.setblocking(True)

    def send(self, frames: list[bytes]) -> None:
        sock = self._connected()
        sock.settimeout(self._timeout)
        try:
            sock.sendall(b"".join(octet_counted(frame) for frame in frames))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class UdpSender:
    """RFC 5426: one syslog message per datagram, no framing (and no knowing whether it arrived)."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._address = (host, port)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)

    def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            self._sock.sendto(frame, self._address)

    def close(self) -> None:
        self._sock.close()
