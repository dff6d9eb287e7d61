"""Helpers for the procedure status pipeline tests: an order to work on, MPPS/IAN datasets, reads of
the stored rows, and a test RIS (a real MLLP listener) that records what it receives."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from broker.hl7.message import parse
from broker.hl7.mllp import FrameDecoder, encode_frame
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.store.tables import (
    CommitmentItem,
    CommitmentRequest,
    MppsInstance,
    OutboxEvent,
    ProcedureTransition,
    RequestedProcedure,
    ScheduledStep,
    table_of,
)
from tests.conftest import sample
from tests.hl7_support import with_control_id

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
NEW = sample("orm_o01_new.hl7")


@dataclass(frozen=True)
class Scheduled:
    """A scheduled order as the tests see it."""

    step_pk: int
    procedure_pk: int
    order_pk: int
    study_instance_uid: str
    sps_id: str
    accession_number: str


def schedule(engine: Engine, mappings: MappingSet, number: int = 1) -> Scheduled:
    """Place the sample ORM^O01 (made unique by ``number``) through the real HL7 intake."""
    raw = NEW
    if number != 1:
        raw = with_control_id(NEW, f"RIS9{number:05d}").replace(b"O-77001", f"O-9{number:04d}".encode()) \
            .replace(b"ACC77001", f"ACC9{number:04d}".encode()).replace(b"SPS77001", f"SPS9{number:04d}".encode()) \
            .replace(b"10.543.77001", f"10.543.9{number:04d}".encode())
    [ack] = Intake(engine, mappings).handle(raw)
    assert b"MSA|AA" in ack, ack
    steps = table_of(ScheduledStep)
    with engine.connect() as db:
        step = db.execute(select(steps).order_by(steps.c.id.desc()).limit(1)).one()
        procedure = db.execute(select(table_of(RequestedProcedure)).where(
            table_of(RequestedProcedure).c.id == step.procedure_fk)).one()
    return Scheduled(step.id, step.procedure_fk, procedure.order_fk, step.study_instance_uid, step.sps_id,
                     step.accession_number)


def mpps_create(study_uid: str, sps_id: str, status: str = "IN PROGRESS", **extra: Any) -> Dataset:
    """An N-CREATE attribute list as a modality sends it (PS3.4 Table F.7.2-1)."""
    ds = Dataset()
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.ScheduledProcedureStepID = sps_id
    item.AccessionNumber = ""
    item.RequestedProcedureID = ""
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = "MULLER^ERIKA"
    ds.PatientID = "MRN4711"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedStationName = ""
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20261123"
    ds.PerformedProcedureStepStartTime = "093000"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = ""
    ds.PerformedSeriesSequence = []
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def performed_series(instances: list[str], series_uid: str | None = None) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = series_uid or generate_uid()
    series.Modality = "CT"
    series.RetrieveAETitle = "ARCHIVE"
    images = []
    for uid in instances:
        image = Dataset()
        image.ReferencedSOPClassUID = CT_IMAGE
        image.ReferencedSOPInstanceUID = uid
        images.append(image)
    series.ReferencedImageSequence = images
    return series


def mpps_final(status: str = "COMPLETED", instances: list[str] | None = None) -> Dataset:
    """An N-SET that ends the PPS with its end date/time and one performed series."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261123"
    ds.PerformedProcedureStepEndTime = "094500"
    ds.PerformedSeriesSequence = [performed_series(instances if instances is not None else [generate_uid()])]
    return ds


def ian(study_uid: str, mpps_uid: str | None, instances: list[str], availability: str = "ONLINE") -> Dataset:
    """An IAN N-CREATE attribute list (PS3.4 Table R.3-1)."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    refs = []
    if mpps_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
        ref.ReferencedSOPInstanceUID = mpps_uid
        ref.PerformedWorkitemCodeSequence = []
        refs.append(ref)
    ds.ReferencedPerformedProcedureStepSequence = refs
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    sops = []
    for uid in instances:
        sop = Dataset()
        sop.ReferencedSOPClassUID = CT_IMAGE
        sop.ReferencedSOPInstanceUID = uid
        sop.InstanceAvailability = availability
        sop.RetrieveAETitle = "ARCHIVE"
        sops.append(sop)
    series.ReferencedSOPSequence = sops
    ds.ReferencedSeriesSequence = [series]
    return ds


def rows(engine: Engine, model: type, **where: Any) -> list[Any]:
    table = table_of(model)
    query = select(table).order_by(table.c.id)
    for name, wanted in where.items():
        query = query.where(table.c[name] == wanted)
    with engine.connect() as db:
        return list(db.execute(query))


def procedure_state(engine: Engine, procedure_pk: int) -> str:
    [row] = rows(engine, RequestedProcedure, id=procedure_pk)
    return str(row.state)


def timeline(engine: Engine, procedure_pk: int) -> list[tuple[str, str, str]]:
    return [(r.from_state, r.to_state, r.event_kind)
            for r in rows(engine, ProcedureTransition, procedure_fk=procedure_pk)]


def step_status(engine: Engine, step_pk: int) -> str:
    [row] = rows(engine, ScheduledStep, id=step_pk)
    return str(row.sps_status)


def outbox(engine: Engine, kind: str | None = None) -> list[Any]:
    return [r for r in rows(engine, OutboxEvent) if kind is None or r.kind == kind]


def mpps_row(engine: Engine, uid: str) -> Any:
    found = rows(engine, MppsInstance, sop_instance_uid=uid)
    return found[0] if found else None


def commitment(engine: Engine) -> list[tuple[Any, list[Any]]]:
    return [(r, rows(engine, CommitmentItem, request_fk=r.id)) for r in rows(engine, CommitmentRequest)]


class ThreadedListener:
    """A TCP listener on 127.0.0.1 served on an asyncio loop in a thread of its own, for the fake peers the
    broker connects to (a RIS): ``stop()`` / ``start()`` take it down and up on the same port (``port`` 0:
    a free one, chosen at the first start), ``close()`` ends it. Subclasses serve each connection in
    ``_serve``."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            task.cancel()

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class TestRis(ThreadedListener):
    """A RIS's HL7 listener on 127.0.0.1: ACKs with AA (MSA-2 = MSH-10) and records every message;
    ``refuse = True`` closes each connection at once, ``stop()`` / ``start()`` take it down and up
    on the same port."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.refuse = False
        self.ack_code = "AA"
        self.received = threading.Condition()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        decoder = FrameDecoder(1 << 20)
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    text = frame.decode("utf-8")
                    message = parse(text)
                    if self.refuse:
                        writer.close()
                        return
                    with self.received:
                        if self.ack_code == "AA":
                            self.messages.append(text)
                        self.received.notify_all()
                    ack = f"MSH|^~\\&|RIS||WLBROKER||20261123||ACK|R1|P|2.3.1\rMSA|{self.ack_code}|" \
                          f"{message.value(message.msh, 10)}\r"
                    writer.write(encode_frame(ack.encode()))
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[str]:
        with self.received:
            self.received.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)


def orc(message: str) -> tuple[str, str]:
    """(ORC-1, ORC-5) of a status message."""
    parsed = parse(message)
    segment = parsed.first("ORC")
    return parsed.value(segment, 1), parsed.value(segment, 5)
