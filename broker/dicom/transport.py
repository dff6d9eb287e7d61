"""TCP details of accepted associations: no delayed ACKs, no Nagle delay on our replies.

DCMTK tools and many modalities write one request in two TCP segments with Nagle's algorithm on: the
second segment leaves only when the first is acknowledged. Linux delays that acknowledgement by up to
40 ms when it expects to piggyback it on a reply, so every request would wait ~40 ms. TCP_QUICKACK
makes the kernel acknowledge at once, but Linux clears it again on its own, so the association re-arms
it before every read and after every write (:func:`quickack`). TCP_NODELAY does the same for the
responses we write.
"""

from __future__ import annotations

import contextlib
import socket

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
