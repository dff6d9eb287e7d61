"""The audit events the broker records, as data: who (participants), what (event), about what (objects).

Each constructor below builds one kind of DICOM audit message of PS3.15 A.5.3 with the codes the
standard gives it; callers name the people, nodes and objects involved and never deal with codes.
The XML (PS3.15 A.5.1) is written from these values when a record is delivered or shown
(:mod:`broker.audit.xml`), so what is stored is small and searchable.

Patient names are never put in an event: a patient is identified by Patient ID (and issuer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Code = tuple[str, str, str]
"""(code value, coding scheme designator, code meaning), as in EventID or EventTypeCode."""

# EventID (PS3.15 A.5.3 / the DCM codes of PS3.16).
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
ORDER_RECORD: Code = ("110109", "DCM", "Order Record")
PATIENT_RECORD: Code = ("110110", "DCM", "Patient Record")
PROCEDURE_RECORD: Code = ("110111", "DCM", "Procedure Record")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")

# EventTypeCode.
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION: Code = ("110132", "DCM", "Use of Restricted Function")
SECURITY_CONFIGURATION: Code = ("110129", "DCM", "Security Configuration")

Action = Literal["C", "R", "U", "D", "E"]
"""EventActionCode: Create, Read, Update, Delete, Execute."""

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
"""EventOutcomeIndicator."""


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a node, application or user taking part.

    ``user_id``: the calling or called AE title for DICOM, ``application^facility`` (MSH-3^MSH-4) for
    HL7, ``token <label>`` for an HTTP token, the broker's own process for its own actions.
    ``host``: the NetworkAccessPointID (an IP address or a host name).
    """

    user_id: str
    host: str = ""
    is_requestor: bool = False
    role: Literal["source", "destination", "application", ""] = ""
    alternative_user_id: str = ""
    """E.g. the process id of the broker, or the AE title when ``user_id`` is a user."""
    user_name: str = ""


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: the patient, study, order, query or resource concerned."""

    kind: Literal["patient", "study", "order", "procedure", "query", "resource"]
    object_id: str
    """Patient ID (``id^^^issuer`` form when the issuer is known), Study Instance UID, accession number,
    SPS ID or UPS SOP Instance UID, the SOP Class UID of a query, a URL path or node for a resource."""
    query: bytes = b""
    """For ``kind="query"``: the query as sent (the C-FIND identifier's bytes, or the URL query string)."""
    details: tuple[tuple[str, str], ...] = ()
    """ParticipantObjectDetail type/value pairs (e.g. ``("TransferSyntax", uid)``)."""
    description: str = ""


@dataclass(frozen=True)
class AuditEvent:
    """One audit message to record."""

    event_id: Code
    action: Action
    participants: tuple[Participant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    event_type: tuple[Code, ...] = ()
    outcome: int = SUCCESS
    outcome_description: str = ""
    """Why it failed (never patient data, never a secret)."""

    @property
    def patient_ids(self) -> tuple[str, ...]:
        """The patients this event concerns (what ``broker audit --patient`` searches)."""
        return tuple(o.object_id for o in self.objects if o.kind == "patient")

    @property
    def requestor(self) -> Participant | None:
        return next((p for p in self.participants if p.is_requestor), None)


@dataclass(frozen=True)
class Source:
    """Where a change came from, for the Order / Procedure / Patient Record events of a domain change."""

    user_id: str
    """AE title, ``application^facility`` of an HL7 sender, ``token <label>``, or ``broker``."""
    host: str = ""
    channel: Literal["hl7", "dicom", "http", "broker"] = "broker"
    extras: dict[str, str] = field(default_factory=dict)


def _requestor(source: Source) -> Participant:
    return Participant(source.user_id, source.host, is_requestor=True, role="source")


def _patient(patient_id: str) -> ParticipantObject:
    return ParticipantObject("patient", patient_id)


def application_activity(started: bool, broker: Participant) -> AuditEvent:
    """Application Activity (A.5.3.1): the broker started or is stopping."""
    return AuditEvent(APPLICATION_ACTIVITY, "E", (broker,),
                      event_type=(APPLICATION_START if started else APPLICATION_STOP,))


def order_record(action: Action, source: Source, broker: Participant, *, patient_id: str,
                 accession_number: str = "", study_uid: str = "", outcome: int = SUCCESS,
                 outcome_description: str = "") -> AuditEvent:
    """Order Record (A.5.3.9): an order created (C), changed (U) or cancelled (D)."""
    objects = [_patient(patient_id)]
    if accession_number:
        objects.append(ParticipantObject("order", accession_number))
    if study_uid:
        objects.append(ParticipantObject("study", study_uid))
    return AuditEvent(ORDER_RECORD, action, (_requestor(source), broker), tuple(objects), outcome=outcome,
                      outcome_description=outcome_description)


def procedure_record(action: Action, source: Source, broker: Participant, *, patient_id: str,
                     study_uid: str = "", accession_number: str = "", step_id: str = "",
                     description: str = "", outcome: int = SUCCESS, outcome_description: str = "") -> AuditEvent:
    """Procedure Record (A.5.3.11): a step or procedure created, changed (MPPS, UPS, commitment) or ended.

    ``description`` says what changed ("MPPS IN PROGRESS", "UPS COMPLETED", "commitment failed").
    """
    objects = [_patient(patient_id)]
    if study_uid:
        objects.append(ParticipantObject("study", study_uid, description=description))
    if accession_number:
        objects.append(ParticipantObject("order", accession_number))
    if step_id:
        objects.append(ParticipantObject("procedure", step_id, description=description))
    return AuditEvent(PROCEDURE_RECORD, action, (_requestor(source), broker), tuple(objects), outcome=outcome,
                      outcome_description=outcome_description)


def patient_record(action: Action, source: Source, broker: Participant, *, patient_id: str,
                   merged_patient_id: str = "") -> AuditEvent:
    """Patient Record (A.5.3.10): demographics updated (U); a merge also names the retired ID (D)."""
    objects = [_patient(patient_id)]
    if merged_patient_id:
        objects.append(ParticipantObject("patient", merged_patient_id, description="merged into " + patient_id))
    return AuditEvent(PATIENT_RECORD, action, (_requestor(source), broker), tuple(objects))


def query(source: Source, broker: Participant, *, what: str, query_bytes: bytes,
          patient_ids: tuple[str, ...] = (), details: tuple[tuple[str, str], ...] = ()) -> AuditEvent:
    """Query (A.5.3.12): a worklist or UPS C-FIND (``what`` = its SOP Class UID, ``query_bytes`` its
    identifier) or a REST read returning patient data (``what`` = the path, ``query_bytes`` the query
    string). ``patient_ids``: the patients the answer named, when known."""
    objects = [ParticipantObject("query", what, query=query_bytes, details=details)]
    objects.extend(_patient(patient_id) for patient_id in patient_ids)
    return AuditEvent(QUERY, "E", (_requestor(source), broker), tuple(objects))


def security_alert(source: Source, broker: Participant, *, alert: Code, reason: str,
                   resource: str = "", outcome: int = MINOR_FAILURE) -> AuditEvent:
    """Security Alert (A.5.3.13): a refused association or unknown AE, a failed TLS handshake
    (``NODE_AUTHENTICATION``), a 401/403 or a replayed message (``USE_OF_RESTRICTED_FUNCTION``).
    ``reason`` is the EventOutcomeDescription; ``resource`` what was asked for (a path, a port)."""
    objects = (ParticipantObject("resource", resource),) if resource else ()
    return AuditEvent(SECURITY_ALERT, "E", (_requestor(source), broker), objects, event_type=(alert,),
                      outcome=outcome, outcome_description=reason)
