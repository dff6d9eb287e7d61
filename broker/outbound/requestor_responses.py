"""Keep a DIMSE response for the pynetdicom call that waits for it, not for the association's reactor.

Why: pynetdicom (2.x to 3.0.4, and its main branch) pauses an association's reactor thread around
each ``send_*`` call with a flag and an event (``_is_paused``, ``_reactor_checkpoint``), and the
handshake has a window: the reactor can set the flag and pass the event just before the caller
clears it, then take the next message off the DIMSE queue (``get_msg(block=False)``). When that
message is the response the caller waits for, the reactor drops it ("Received unexpected N-ACTION
service message"); the caller sees nothing until its DIMSE timeout, aborts, and the request is
retried although the peer answered. The window is microseconds on an idle machine and milliseconds
under load, when the reactor thread waits for the interpreter lock: a loopback capture showed the
response leaving the peer whole, in order and acknowledged by the requestor's TCP, while the caller
timed out (pynetdicom's issue #875 is the same symptom for C-FIND).

The reactor only needs the queue for requests the peer sends to an idle association (a report on a
commitment association, a C-STORE between C-GETs); the caller's blocking read takes everything else.
:func:`keep_responses_for_the_caller` makes the reactor's non-blocking read take a message only when
it is a request, in one step under the queue's lock, and leaves a response (or the ``(None, None)``
that wakes a caller on abort) where the caller's blocking read finds it.
"""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider

_installing = threading.Lock()
_ORIGINAL = DIMSEServiceProvider.get_msg


def _get_msg(self: DIMSEServiceProvider, block: bool = False) -> Any:
    """pynetdicom's ``get_msg``; the non-blocking read (the reactor's) takes requests only."""
    if block:
        return _ORIGINAL(self, block)
    waiting = self.msg_queue
    with waiting.mutex:
        if not waiting.queue or not getattr(waiting.queue[0][1], "is_valid_request", False):
            return None, None
        item = waiting.queue.popleft()
        waiting.not_full.notify()
        return item


def keep_responses_for_the_caller() -> None:
    """Install the guarded ``get_msg`` on pynetdicom's DIMSE provider (idempotent, process-wide)."""
    with _installing:
        if DIMSEServiceProvider.get_msg is not _get_msg:
            DIMSEServiceProvider.get_msg = _get_msg  # type: ignore[method-assign]
