"""TCP and TLS details of accepted associations: no delayed ACKs, no Nagle delay on our replies, and the
TLS handshake of a connection on the TLS port.

DCMTK tools and many modalities write one request in two TCP segments with Nagle's algorithm on: the
second segment leaves only when the first is acknowledged. Linux delays that acknowledgement by up to
40 ms when it expects to piggyback it on a reply, so every request would wait ~40 ms. TCP_QUICKACK
makes the kernel acknowledge at once, but Linux clears it again on its own, so the association re-arms
it before every read and after every write (:func:`quickack`). TCP_NODELAY does the same for the
responses we write. Both are options of the TCP socket and hold for a TLS connection over it as well.

The TLS handshake (:func:`tls_handshake`) runs in the association's own thread, never in the accept
loop, and within one deadline for all of it: a client that stalls, or trickles its handshake a byte at
a time, costs its own thread that long at most.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable

# socket.TCP_QUICKACK exists on Linux only; elsewhere the option is silently not used.
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def quickack(sock: socket.socket) -> None:
    """(Re-)arm TCP_QUICKACK on ``sock``; a no-op where the option does not exist."""
    if _TCP_QUICKACK is None:
        return
    with contextlib.suppress(OSError):  # closed under us: the read or write that follows reports it
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def tune_accepted(sock: socket.socket, use_quickack: bool) -> None:
    """TCP_NODELAY, and TCP_QUICKACK when asked for, on a freshly accepted connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if use_quickack:
        quickack(sock)


class ClosedBeforeHandshake(Exception):
    """The client closed the connection without sending a byte (a port probe, a health check)."""


def tls_handshake(sock: socket.socket, context: ssl.SSLContext, timeout: float,
                  wrapped: Callable[[ssl.SSLSocket], None] = lambda _: None) -> ssl.SSLSocket:
    """The server side of the TLS handshake on an accepted ``sock``, all of it within ``timeout`` s.

    ``wrapped`` is told the TLS socket as soon as it exists (``sock`` is detached into it), so that
    whoever keeps the connections to close them at a stop keeps the right object. Raises
    :class:`ClosedBeforeHandshake`, :class:`TimeoutError`, :class:`ssl.SSLError` (the client's
    certificate refused, no certificate, an old protocol version, not TLS at all) or another OSError;
    the caller closes what it was told of, or ``sock``.
    """
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    if not sock.recv(1, socket.MSG_PEEK):
        raise ClosedBeforeHandshake
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    wrapped(tls)
    # CPython bounds do_handshake as a whole by the socket's timeout (one deadline for all its reads).
    tls.settimeout(max(deadline - time.monotonic(), 0.001))
    tls.do_handshake()
    return tls
