"""An audit event as the DICOM audit message of PS3.15 A.5.1 (XML), written when shipped or shown.

Built as a string with escaping, not with an XML library: it runs for every record the shipper sends
(every C-FIND), and string building is several times cheaper than an element tree. The schema the
output follows is :file:`dicom-audit-message.rng` (the standard's, in RELAX NG XML syntax); the tests
validate every event constructor's message against it.

Choices the standard leaves to the implementation (also in the conformance statement):

* A patient is identified by Patient ID only (no names in the trail); the schema requires a
  ParticipantObjectName or ParticipantObjectQuery, so ParticipantObjectName repeats the ID (or, for a
  retired ID of a merge, says which ID it was merged into).
* An accession number goes where PS3.15 A.5.3 puts it, as ``Accession`` in the study's
  ParticipantObjectDescription; an order with no study yet is an object of its own identified by the
  accession number (HL7 identifier type ``ACSN``).
* A scheduled step or UPS workitem is a "Job" (role 20), identified under the local coding scheme
  ``99BROKER``; a REST resource or a refused port is a "Security Resource" (role 13) identified as a URI.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from functools import cache

from broker.audit.events import AuditEvent, Code, Participant, ParticipantObject

_ROLES: dict[str, Code] = {
    "source": ("110153", "DCM", "Source Role ID"),
    "destination": ("110152", "DCM", "Destination Role ID"),
    "application": ("110150", "DCM", "Application"),
}
_PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
_STUDY_UID: Code = ("110180", "DCM", "Study Instance UID")
_SOP_CLASS_UID: Code = ("110181", "DCM", "SOP Class UID")
_URI: Code = ("12", "RFC-3881", "URI")
_ACCESSION: Code = ("ACSN", "HL7", "Accession ID")
_STEP: Code = ("SPS", "99BROKER", "Scheduled Procedure Step or UPS workitem")
APPLICATION_SERVER = "4"
"""AuditSourceTypeCode: Application server process tier in a multi-tier system."""

# XML 1.0 forbids these characters even escaped: a control character in an AE title or a query's text
# shows as U+FFFD instead of making the message invalid.
_ESCAPES = {ord("&"): "&amp;", ord("<"): "&lt;", ord(">"): "&gt;", ord('"'): "&quot;",
            **{c: "\ufffd" for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)},
            0x09: "&#9;", 0x0A: "&#10;", 0x0D: "&#13;", 0xFFFE: "\ufffd", 0xFFFF: "\ufffd"}
_SURROGATES = re.compile("[\ud800-\udfff]")


def escape(value: str) -> str:
    """``value`` as XML text or a double-quoted attribute value."""
    escaped = value.translate(_ESCAPES)
    return _SURROGATES.sub("\ufffd", escaped) if not escaped.isascii() else escaped


@cache
def _code(element: str, code: Code) -> str:
    value, scheme, meaning = code
    return (f'<{element} csd-code="{escape(value)}" codeSystemName="{escape(scheme)}" '
            f'originalText="{escape(meaning)}"/>')


_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def _participant(p: Participant) -> str:
    attributes = [f'UserID="{escape(p.user_id)}"']
    if p.alternative_user_id:
        attributes.append(f'AlternativeUserID="{escape(p.alternative_user_id)}"')
    if p.user_name:
        attributes.append(f'UserName="{escape(p.user_name)}"')
    attributes.append('UserIsRequestor="true"' if p.is_requestor else 'UserIsRequestor="false"')
    if p.host:
        kind = "2" if _IPV4.match(p.host) or ":" in p.host else "1"
        attributes.append(f'NetworkAccessPointID="{escape(p.host)}" NetworkAccessPointTypeCode="{kind}"')
    role = _code("RoleIDCode", _ROLES[p.role]) if p.role else ""
    return f'<ActiveParticipant {" ".join(attributes)}>{role}</ActiveParticipant>' if role else \
        f'<ActiveParticipant {" ".join(attributes)}/>'


def _details(o: ParticipantObject) -> str:
    return "".join(f'<ParticipantObjectDetail type="{escape(kind)}" '
                   f'value="{base64.b64encode(value.encode()).decode("ascii")}"/>' for kind, value in o.details)


def _object(o: ParticipantObject, accessions: list[str]) -> str:
    """One ParticipantObjectIdentification; ``accessions`` go into a study's description."""
    name = escape(o.description or o.object_id)
    description = ""
    if o.kind == "patient":
        type_code, role, id_type = "1", "1", _PATIENT_NUMBER
    elif o.kind == "study":
        type_code, role, id_type = "2", "3", _STUDY_UID
        if accessions:
            description = ("<ParticipantObjectDescription>"
                           + "".join(f'<Accession Number="{escape(a)}"/>' for a in accessions)
                           + "</ParticipantObjectDescription>")
    elif o.kind == "order":
        type_code, role, id_type = "2", "20", _ACCESSION
    elif o.kind == "procedure":
        type_code, role, id_type = "2", "20", _STEP
    elif o.kind == "query":
        type_code, role = "2", "24"
        id_type = _URI if o.object_id.startswith("/") else _SOP_CLASS_UID
        query = base64.b64encode(o.query).decode("ascii")
        return (f'<ParticipantObjectIdentification ParticipantObjectID="{escape(o.object_id)}" '
                f'ParticipantObjectTypeCode="{type_code}" ParticipantObjectTypeCodeRole="{role}">'
                f'{_code("ParticipantObjectIDTypeCode", id_type)}'
                f'<ParticipantObjectQuery>{query}</ParticipantObjectQuery>{_details(o)}'
                "</ParticipantObjectIdentification>")
    else:  # resource
        type_code, role, id_type = "2", "13", _URI
    return (f'<ParticipantObjectIdentification ParticipantObjectID="{escape(o.object_id)}" '
            f'ParticipantObjectTypeCode="{type_code}" ParticipantObjectTypeCodeRole="{role}">'
            f'{_code("ParticipantObjectIDTypeCode", id_type)}'
            f'<ParticipantObjectName>{name}</ParticipantObjectName>{_details(o)}{description}'
            "</ParticipantObjectIdentification>")


def event_datetime(when: datetime) -> str:
    """EventDateTime: unambiguous as to time zone (a naive time is the broker's local time)."""
    return when.astimezone().isoformat(timespec="milliseconds")


def render(event: AuditEvent, *, source_id: str, site_id: str, when: datetime) -> str:
    """The AuditMessage for ``event`` as reported by ``source_id`` (AuditSourceID) of ``site_id``."""
    has_study = any(o.kind == "study" for o in event.objects)
    accessions = [o.object_id for o in event.objects if o.kind == "order"] if has_study else []
    parts = [f'<AuditMessage><EventIdentification EventActionCode="{event.action}" '
             f'EventDateTime="{event_datetime(when)}" EventOutcomeIndicator="{event.outcome}">',
             _code("EventID", event.event_id)]
    parts.extend(_code("EventTypeCode", code) for code in event.event_type)
    if event.outcome_description:
        parts.append(f"<EventOutcomeDescription>{escape(event.outcome_description)}</EventOutcomeDescription>")
    parts.append("</EventIdentification>")
    parts.extend(_participant(p) for p in event.participants)
    site = f' AuditEnterpriseSiteID="{escape(site_id)}"' if site_id else ""
    parts.append(f'<AuditSourceIdentification{site} AuditSourceID="{escape(source_id)}">'
                 f'<AuditSourceTypeCode csd-code="{APPLICATION_SERVER}"/></AuditSourceIdentification>')
    first_study = True
    for o in event.objects:
        if o.kind == "order" and has_study:
            continue  # carried by the study's description
        parts.append(_object(o, accessions if o.kind == "study" and first_study else []))
        if o.kind == "study":
            first_study = False
    parts.append("</AuditMessage>")
    return "".join(parts)
