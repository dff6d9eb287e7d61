"""Free TCP ports for the servers the tests start, never the same one twice in a test session.

The kernel may hand out a just-released ephemeral port again at once: two calls in a row once gave
the same number for a broker's MLLP and DICOM ports, and the second listener could not bind.
"""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A port that was free a moment ago and that no earlier call of this session returned."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
