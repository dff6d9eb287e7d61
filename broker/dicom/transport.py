"""TCP details of accepted associations: no delayed ACKs, no Nagle delay on our replies.

DCMTK tools and many modalities write one request in two TCP segments with Nagle's algorithm on: the
second segment leaves only when the first is acknowledged. Linux delays that acknowledgement by up to
40 ms when it expects to piggyback it on a reply, so every request would wait ~40 ms. TCP_QUICKACK
makes the kernel acknowledge at once, but Linux clears it again on its own, so it is re-armed before
every read and after every write. TCP_NODELAY does the same for the responses we write.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Any

from pynetdicom.transport import AssociationSocket, RequestHandler

if TYPE_CHECKING:
    from pynetdicom.association import Association

# socket.TCP_QUICKACK exists on Linux only; elsewhere the option is silently not used.
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _quickack(sock: socket.socket | None) -> None:
    if sock is None or _TCP_QUICKACK is None:
        return
    with contextlib.suppress(OSError):  # closed under us: the read or write that follows reports it
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


class QuickAckSocket(AssociationSocket):
    """An :class:`AssociationSocket` that keeps TCP_QUICKACK armed around every read and write."""

    def recv(self, nr_bytes: int) -> bytearray:
        _quickack(self.socket)
        data = super().recv(nr_bytes)
        _quickack(self.socket)
        return data

    def send(self, bytestream: bytes) -> None:
        super().send(bytestream)
        _quickack(self.socket)


class TunedRequestHandler(RequestHandler):
    """pynetdicom's request handler with TCP_NODELAY and, if enabled, TCP_QUICKACK sockets."""

    quickack = True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        request: Any = self.request
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.quickack and _TCP_QUICKACK is not None:
            # pynetdicom builds its AssociationSocket inside this method and a second one would queue
            # a second "connection open" event; the subclass adds behaviour only, no state, so the
            # socket pynetdicom made becomes one.
            assoc.dul.socket.__class__ = QuickAckSocket
            _quickack(request)
        return assoc


def request_handler(quickack: bool) -> type[TunedRequestHandler]:
    """The request handler class for the server, with TCP_QUICKACK on or off."""
    return type("BrokerRequestHandler", (TunedRequestHandler,), {"quickack": quickack})
