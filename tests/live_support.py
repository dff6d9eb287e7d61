"""Reading the board's live stream (``GET /api/stream``, server-sent events) as the board's page does."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx


def read_procedure_events(response: httpx.Response, into: list[Any], connected: threading.Event,
                          arrived: threading.Event) -> None:
    """Read ``response`` until it ends: set ``connected`` at the stream's ``: connected`` comment, and for
    each ``procedures`` event add its procedures to ``into`` and set ``arrived``. For a reader thread."""
    event = ""
    try:
        for line in response.iter_lines():
            if line == ": connected":
                connected.set()
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "procedures":
                into.extend(json.loads(line[6:]))
                arrived.set()
    except httpx.HTTPError:
        pass
