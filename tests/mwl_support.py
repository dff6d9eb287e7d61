"""HL7 orders for worklist tests: one OMI^O23 per step, built from the few fields a test varies.

Items are made the way production makes them, through the HL7 intake, so that the worklist tests
match on exactly what the mapping stores.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.hl7.mllp_client import MLLPClient
from broker.intake.service import Intake

UID_PREFIX = "1.2.826.0.1.3680043.10.543.77."
CODECS = {"UNICODE UTF-8": "utf-8", "8859/1": "latin-1"}


@dataclass(frozen=True)
class Order:
    """One OMI^O23 order with one step (IPC); the fields the tests vary."""

    sps: str  # SPS ID; accession, RP ID, order numbers and Study Instance UID derive from it
    station: str  # IPC-9
    modality: str = "CT"
    start: str = "20261123093000"  # TQ1-7, "" = no start
    name: str = "DOE^JANE"  # PID-5 (XPN)
    patient_id: str = ""  # default "P" + sps
    performing: str = ""  # OBR-34 without the ID component, e.g. "GREY^MEREDITH"
    accession: str = ""  # default "A" + sps
    birth_date: str = "19700101"
    charset: str = "UNICODE UTF-8"  # MSH-18
    study_uid: str | None = ""  # "" = derived from sps, None = not sent (the broker generates one)
    then: tuple[str, ...] = ()  # later ORC-1^ORC-5 changes: "CA^CA", "SC^IP", "SC^CM", "DC^CA"


def omi(order: Order, control: str = "NW", status: str = "SC", control_id: str = "") -> bytes:
    """The order as an HL7 v2.5.1 OMI^O23 message in its own character set."""
    derived = UID_PREFIX + "".join(str(ord(c)) for c in order.sps)  # stable, and no leading zero
    uid = derived if order.study_uid == "" else (order.study_uid or "")
    obr = ["OBR", "1", f"PL{order.sps}^CERNER", f"FL{order.sps}^RADRIS", "PROC^PROCEDURE^LOCAL"] + [""] * 30
    obr[24] = order.modality
    obr[34] = f"1^{order.performing}" if order.performing else ""
    ipc = ["IPC", f"{order.accession or 'A' + order.sps}^CITYMED", f"R{order.sps}", uid, order.sps,
           order.modality, "PROTO^PROTOCOL^LOCAL", "", "", order.station]
    segments = [
        f"MSH|^~\\&|CERNER|CITYMED|WLBROKER|RADIOLOGY|20261120080000||OMI^O23^OMI_O23|"
        f"{control_id or order.sps + control}|P|2.5.1||||||{order.charset}",
        f"PID|1||{order.patient_id or 'P' + order.sps}^^^CITYMED^MR||{order.name}||{order.birth_date}|F",
        "PV1|1|O|WARD3^301^B^CITYMED",
        f"ORC|{control}|PL{order.sps}^CERNER|FL{order.sps}^RADRIS||{status}",
        f"TQ1|1||||||{order.start}||R",
        "|".join(obr).rstrip("|"),
        "|".join(ipc),
    ]
    return "\r".join(segments).encode(CODECS[order.charset])


def messages(*orders: Order) -> list[bytes]:
    """Each order's OMI, then its later status changes, in sending order."""
    return [message for order in orders for message in
            [omi(order)] + [omi(order, *change.split("^"), control_id=f"{order.sps}-{n}")
                            for n, change in enumerate(order.then)]]


def place(intake: Intake, *orders: Order) -> None:
    """Hand each order and its changes to the intake; every message must be accepted."""
    for message in messages(*orders):
        [reply] = intake.handle(message)
        assert b"MSA|AA|" in reply, reply


def send(port: int, *orders: Order) -> None:
    """Send each order and its changes over MLLP to the listener on ``port``; every one must get AA."""
    with MLLPClient("127.0.0.1", port) as client:
        for message in messages(*orders):
            reply = client.send(message)
            assert b"MSA|AA|" in reply, reply
