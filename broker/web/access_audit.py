"""The audit records of HTTP requests: who read patient data (Query), and who was refused (Security Alert).

* Each successful GET of patient data (``/api/procedures...``, ``/api/steps...``, ``/api/messages...``,
  the opening of ``/api/stream``, DICOMweb under ``/dicomweb/``, the board's wall view ``/api/board/wall...``
  (initials) and ``/api/board/alerts``) is a Query event: the caller's token
  label and address, the path and query string (without a ``token`` parameter: the stream's token is a
  secret), and the patients the answer named when the route knew them cheaply (:func:`note_patients`).
* Each 401 and 403 is a Security Alert (Use of Restricted Function): the token's label when the token
  was known (a 403), else ``anonymous``; the address; the path.

Events go to the audit trail's :class:`~broker.audit.trail.AuditWriter` (batched, never blocking the
request); without one (audit off) nothing is recorded. Pure ASGI: the live stream is not buffered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

import structlog
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.audit import events as audit_events
from broker.audit.events import AuditEvent, Participant, Source

log = structlog.get_logger(__name__)
PATIENT_DATA_PATHS = ("/api/procedures", "/api/steps", "/api/messages", "/api/stream", "/dicomweb/", "/api/board/wall",
                      "/api/board/alerts")
ANONYMOUS = "anonymous"
_PATIENTS = "audit_patients"


def note_patients(request: Request, patient_ids: Iterable[str]) -> None:
    """Name the patients of this request's answer in its Query record (``id`` or ``id^^^issuer``)."""
    setattr(request.state, _PATIENTS, tuple(dict.fromkeys(p for p in patient_ids if p)))


def patient_ref(patient_id: str, issuer: str = "") -> str:
    """A patient as the audit trail names one: the Patient ID, with its issuer when known."""
    return f"{patient_id}^^^{issuer}" if issuer and patient_id else patient_id


class AccessAudit:
    """Records the Query and Security Alert events of HTTP requests (see the module's docstring)."""

    def __init__(self, app: ASGIApp, submit: Callable[[AuditEvent], None] | None,
                 broker: Callable[[], Participant]) -> None:
        self.app = app
        self.submit = submit
        self.broker = broker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.submit is None:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                self._record(scope, state, status[0])  # before the body: the stream's opening too
            await send(message)

        await self.app(scope, receive, watch)

    def _record(self, scope: Scope, state: dict[str, Any], status: int) -> None:
        path: str = scope.get("path", "")
        client = scope.get("client")
        source = Source(getattr(state.get("caller"), "label", None) or ANONYMOUS,
                        str(client[0]) if client else "", "http")
        event: AuditEvent | None = None
        try:
            if status in (401, 403):
                reason = "no valid API token" if status == 401 else "the token's role does not allow this"
                event = audit_events.security_alert(source, self.broker(), reason=reason, resource=path,
                                                    alert=audit_events.USE_OF_RESTRICTED_FUNCTION)
            elif 200 <= status < 300 and scope.get("method") == "GET" and path.startswith(PATIENT_DATA_PATHS):
                event = audit_events.query(source, self.broker(), what=path,
                                           query_bytes=_query_without_token(scope),
                                           patient_ids=tuple(state.get(_PATIENTS, ())))
            if event is not None and self.submit is not None:
                self.submit(event)
        except Exception as exc:  # the audit trail's trouble is logged, the answer still goes out
            log.error("web.audit_failed", path=path, error=type(exc).__name__)


def handshake_alert(broker: Participant, peer: str, reason: str, port: int) -> AuditEvent:
    """The Security Alert (Node Authentication) of a failed TLS handshake on the HTTPS port."""
    return audit_events.security_alert(Source(ANONYMOUS, peer, "http"), broker, reason=reason,
                                       resource=f"https port {port}", alert=audit_events.NODE_AUTHENTICATION)


def _query_without_token(scope: Scope) -> bytes:
    raw: bytes = scope.get("query_string", b"")
    if b"token" not in raw:
        return raw
    kept = [part for part in raw.split(b"&") if unquote_to_bytes(part.split(b"=", 1)[0]) != b"token"]
    return b"&".join(kept)  # the rest as sent
