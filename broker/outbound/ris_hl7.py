"""HL7 status messages to the RIS: ORC-1 = SC with ORC-5 = IP / CM / DC (spec section 4).

ORM^O01 (v2.3.1), OMI^O23 or ORU^R01 (v2.5.1), per ``ris_status_message_type``. MSH-10 is derived
from the event id, so a retried message has the same control ID and the RIS can recognise a repeat.
The message is sent over one persistent MLLP connection per process and address (with TLS when
``ris_hl7_tls`` is on: the RIS's certificate verified, the broker's presented); the RIS's ACK
decides: AA / CA is delivered, anything else (AE, AR, CE, CR, no reply) raises, and the event is
retried with backoff.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

import structlog

from broker.hl7.message import escape, parse
from broker.hl7.mllp_client import MLLPClient
from broker.mapping.transforms import xpn_field

log = structlog.get_logger(__name__)

VERSIONS = {"ORM^O01": "2.3.1", "OMI^O23": "2.5.1", "ORU^R01": "2.5.1"}
STRUCTURES = {"ORM^O01": "ORM^O01", "OMI^O23": "OMI^O23^OMI_O23", "ORU^R01": "ORU^R01^ORU_R01"}


class RisRefused(Exception):
    """The RIS answered with something other than AA / CA."""


def _escape(value: Any) -> str:
    return escape(str(value or ""))




def control_id(event_id: str) -> str:
    """MSH-10 for an event: stable across retries, at most 20 characters."""
    return "S" + event_id.replace("-", "")[:19]


def build_status_message(payload: dict[str, Any], message_type: str, event_id: str) -> str:
    """The status message for a ``ris.status`` payload (segments joined by CR)."""
    e = _escape
    version = VERSIONS[message_type]
    receiver_app, _, receiver_facility = str(payload.get("sender", "")).partition("^")
    msh = "|".join(["MSH", "^~\\&", "WLBROKER", "", e(receiver_app), e(receiver_facility), payload["at"], "",
                    STRUCTURES[message_type], control_id(event_id), "P", version])
    patient_id = e(payload["patient_id"]) + (f"^^^{e(payload['issuer_of_patient_id'])}"
                                             if payload.get("issuer_of_patient_id") else "")
    pid = f"PID|1||{patient_id}||{xpn_field(str(payload.get('patient_name') or ''))}"
    placer = e(payload["placer_order_number"]) + (f"^{e(payload['placer_issuer'])}" if payload.get("placer_issuer")
                                                  else "")
    filler = e(payload["filler_order_number"]) + (f"^{e(payload['filler_issuer'])}" if payload.get("filler_issuer")
                                                  else "")
    orc = f"ORC|SC|{placer}|{filler}||{payload['order_status']}||||{payload['at']}"
    service = f"{e(payload.get('requested_procedure_id', ''))}^{e(payload.get('description', ''))}"
    if message_type == "ORM^O01":
        obr = f"OBR|1|{placer}|{filler}|{service}" + "|" * 14 + f"{e(payload['accession_number'])}"
        zds = f"ZDS|{e(payload['study_instance_uid'])}"
        segments = [msh, pid, orc, obr, zds]
    elif message_type == "OMI^O23":
        obr = f"OBR|1|{placer}|{filler}|{service}"
        ipc = (f"IPC|{e(payload['accession_number'])}|{e(payload.get('requested_procedure_id', ''))}|"
               f"{e(payload['study_instance_uid'])}|{e(payload.get('sps_id', ''))}|{e(payload.get('modality', ''))}")
        segments = [msh, pid, orc, obr, ipc]
    else:  # ORU^R01: OBR-25 result status P (in progress) / F (final) / X (discontinued)
        result = {"IP": "I", "CM": "F", "DC": "X"}.get(payload["order_status"], "")
        obr = f"OBR|1|{placer}|{filler}|{service}" + "|" * 21 + result
        segments = [msh, pid, orc, obr]
    return "\r".join(segments) + "\r"


class RisStatusSender:
    """Sends status messages to one RIS address over a persistent connection (reconnecting on error).

    ``ssl_context`` (:func:`broker.tls.client_context`): connect with TLS. A RIS whose certificate is not
    accepted fails the delivery like a RIS that is down, and the event is retried.
    """

    def __init__(self, host: str, port: int, message_type: str = "ORM^O01", ack_timeout: float = 10.0, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.message_type = message_type
        self.client = MLLPClient(host, port, timeout=ack_timeout, ssl_context=ssl_context)
        self.lock = threading.Lock()  # one message at a time on the one connection

    def send(self, payload: dict[str, Any], event_id: str) -> None:
        """Send and wait for the ACK; raises (MLLPError, RisRefused) unless it is AA / CA."""
        message = build_status_message(payload, self.message_type, event_id)
        with self.lock:
            reply = self.client.send(message.encode("utf-8"))
        ack = parse(reply.decode("utf-8", errors="replace"))
        msa = ack.first("MSA")
        code, acked = ack.value(msa, 1), ack.value(msa, 2)
        if acked and acked != control_id(event_id):
            self.client.close()  # out of step with the RIS: start a fresh connection
            raise RisRefused(f"ACK for {acked}, expected {control_id(event_id)}")
        if code not in ("AA", "CA"):
            raise RisRefused(f"RIS answered {code or 'no MSA'}: {ack.value(msa, 3)}")
        log.info("ris.status_sent", order_pk=payload.get("order_pk"), order_status=payload["order_status"],
                 control_id=control_id(event_id))

    def close(self) -> None:
        self.client.close()
