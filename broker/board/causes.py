"""The timeline's causes as people read them ("MPPS from CT01: in progress"), the UID kept apart for a
details toggle.

The stored cause is the text the service wrote ("MPPS 1.2.3... IN PROGRESS", "UPS 1.2... COMPLETED by
CT01", "Storage Commitment 1.2... committed"); the event kind and reference (the UID or HL7 control ID)
are stored beside it. Here the reference is taken out of the text and the sender put in front.
"""

from __future__ import annotations

import re

_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_BY = re.compile(r"^(?P<what>.*?)\s+(?:requested\s+)?by\s+(?P<who>\S+)$")
KINDS = {"mpps": "MPPS", "ups": "UPS", "ian": "IAN", "stgcmt": "Storage Commitment"}


def readable(kind: str, ref: str, text: str, station: str = "") -> str:
    """The cause without its UID, as "<what> from <station>: <outcome>" where the sender is known.

    ``station``: the AE title the event came from (MPPS, IAN: the calling AE; Storage Commitment: the
    archive) when the caller knows it; a UPS cause names it itself ("... by CT01").
    """
    rest = text.replace(ref, "") if ref else text
    rest = _UID.sub("", rest)
    rest = " ".join(rest.split())
    name = KINDS.get(kind)
    if name is None:
        return rest or text
    if rest.startswith(name):
        rest = rest[len(name):].strip(" :")
    if kind == "ups":
        found = _BY.match(rest)
        if found:
            rest, station = found["what"], found["who"]
        rest = {"N-CREATE": "workitem created"}.get(rest, rest)
        if "cancel" in text:
            rest = "cancel requested"
    if kind == "ian" and not rest:
        rest = "images available"
    outcome = rest.lower() if rest.isupper() else rest
    sender = f" from {station}" if station else ""
    return f"{name}{sender}: {outcome}" if outcome else f"{name}{sender}"
