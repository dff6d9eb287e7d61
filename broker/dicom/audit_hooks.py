"""The audit events of the DICOM edge: each C-FIND (Query) and each refused connection (Security Alert).

Built cheaply and handed to the :class:`~broker.audit.trail.AuditWriter`, which batches its inserts:
recording every C-FIND must not slow the worklist. A query is recorded as it came, with the
identifier's bytes as received (PS3.15 A.5.3.12: the ParticipantObjectQuery) and its transfer
syntax as a detail, before it runs; the patients of the answer are not listed (they would cost the
query path a pass over every response).
"""

from __future__ import annotations

from broker.audit import events
from broker.audit.events import Participant, Source
from broker.audit.trail import AuditWriter, broker_participant
from broker.dicom.association import Request


class DicomAudit:
    """The DICOM AE's audit hooks, on one :class:`AuditWriter`."""

    def __init__(self, writer: AuditWriter, ae_title: str) -> None:
        self.writer = writer
        self.ae_title = ae_title
        self._broker: Participant | None = None

    @property
    def broker(self) -> Participant:
        """The broker as the destination ActiveParticipant (made once: its host name and pid do not change)."""
        if self._broker is None:
            self._broker = broker_participant(self.ae_title)
        return self._broker

    def query(self, request: Request) -> None:
        """A worklist or UPS C-FIND: who asked (calling AE, address), the SOP Class, the identifier."""
        peer = request.peer
        context = request.context
        self.writer.submit(events.query(
            Source(peer.calling_ae_title, peer.address, "dicom"), self.broker,
            what=str(request.command.get("AffectedSOPClassUID") or context.abstract_syntax),
            query_bytes=request.data_set_bytes, details=(("TransferSyntax", context.transfer_syntax),)))

    def refused(self, calling_ae_title: str, address: str, reason: str, port: int) -> None:
        """An association refused for who the caller is (not on the allow-list, the wrong certificate)."""
        self._alert(calling_ae_title or address, address, reason, port)

    def handshake_failed(self, address: str, reason: str, port: int) -> None:
        """A TLS handshake that failed (no, an untrusted or an expired certificate; an old protocol)."""
        self._alert(address, address, f"TLS handshake failed: {reason}", port)

    def _alert(self, user_id: str, address: str, reason: str, port: int) -> None:
        self.writer.submit(events.security_alert(
            Source(user_id, address, "dicom"), self.broker, alert=events.NODE_AUTHENTICATION, reason=reason,
            resource=f"DICOM {self.ae_title} port {port}"))
