"""An :class:`~broker.audit.events.AuditEvent` as the JSON kept in ``audit_records.event``, and back.

Stored as values, not as XML: a record is small, and its XML (PS3.15 A.5.1) is written from these values
when it is delivered or shown, with the source and site identity the broker has then. Keys are short
because every C-FIND writes one; ``q`` (a query's bytes) is base64.
"""

from __future__ import annotations

import base64
from typing import Any, cast

from broker.audit.events import Action, AuditEvent, Code, Participant, ParticipantObject


def _code(code: Code) -> list[str]:
    return list(code)


def _participant(p: Participant) -> dict[str, Any]:
    out: dict[str, Any] = {"u": p.user_id}
    if p.host:
        out["h"] = p.host
    if p.is_requestor:
        out["r"] = True
    if p.role:
        out["role"] = p.role
    if p.alternative_user_id:
        out["alt"] = p.alternative_user_id
    if p.user_name:
        out["name"] = p.user_name
    return out


def _object(o: ParticipantObject) -> dict[str, Any]:
    out: dict[str, Any] = {"k": o.kind, "id": o.object_id}
    if o.query:
        out["q"] = base64.b64encode(o.query).decode("ascii")
    if o.details:
        out["d"] = [list(pair) for pair in o.details]
    if o.description:
        out["desc"] = o.description
    return out


def to_json(event: AuditEvent) -> dict[str, Any]:
    """The event as a JSON document (what :func:`from_json` reads back)."""
    out: dict[str, Any] = {"id": _code(event.event_id), "a": event.action,
                           "p": [_participant(p) for p in event.participants]}
    if event.objects:
        out["o"] = [_object(o) for o in event.objects]
    if event.event_type:
        out["t"] = [_code(c) for c in event.event_type]
    if event.outcome:
        out["out"] = event.outcome
    if event.outcome_description:
        out["why"] = event.outcome_description
    return out


def _as_code(value: list[str]) -> Code:
    return (value[0], value[1], value[2])


def from_json(document: dict[str, Any]) -> AuditEvent:
    """The event stored by :func:`to_json`."""
    participants = tuple(
        Participant(p["u"], p.get("h", ""), bool(p.get("r", False)), p.get("role", ""), p.get("alt", ""),
                    p.get("name", ""))
        for p in document.get("p", ()))
    objects = tuple(
        ParticipantObject(o["k"], o["id"], base64.b64decode(o["q"]) if "q" in o else b"",
                          tuple((str(k), str(v)) for k, v in o.get("d", ())), o.get("desc", ""))
        for o in document.get("o", ()))
    return AuditEvent(_as_code(document["id"]), cast(Action, document["a"]), participants, objects,
                      tuple(_as_code(c) for c in document.get("t", ())), int(document.get("out", 0)),
                      document.get("why", ""))
