"""MPPS pipeline benchmark: MPPS N-CREATE + N-SET COMPLETED pairs into procedure state and HL7 status.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/mpps_pipeline.py                 # 1,000 pairs from 10 clients, SQLite
    .venv/bin/python bench/mpps_pipeline.py --quick         # 100 pairs: does everything work?
    .venv/bin/python bench/mpps_pipeline.py --backend postgresql --client-mode processes

It starts, each in its own process group, a dedicated ``redis-server`` on a free port (or uses
``--redis-url``), ``broker run`` (relay thread, DICOM and HL7 listeners) and ONE ``broker worker``
(Celery, ``--worker-concurrency`` pool processes), with ``BROKER_REDIS_URL`` and
``BROKER_RIS_HL7_ADDRESS`` pointing at a test RIS: an asyncio MLLP listener in this process that ACKs
(AA) and timestamps every message. Then:

1. places ``--pairs`` orders over HL7 (ORM^O01 NW, unique ids, as in ``hl7_throughput.py``), one MLLP
   connection; the scheduled steps are read back from the database (Study Instance UID, SPS ID);
2. ``--clients`` concurrent pynetdicom MPPS SCUs (threads in this process, or spread over processes with
   ``--client-mode processes`` when the GIL limits the client side), each on one association, perform the
   pairs: N-CREATE IN PROGRESS linked to a step, then N-SET COMPLETED with a Performed Series Sequence;
3. waits until every ``ris.status`` outbox row is done (or ``--drain-timeout``).

Reported: MPPS operations/s accepted (successful N-CREATE + N-SET responses per second, from the first
request to the last response), p50/p99 N-CREATE and N-SET response latency; p50/p99 from N-SET COMPLETED
sent to the procedure's COMPLETED transition (``procedure_transitions.at``; the broker stamps it inside
the transaction that commits it before the N-SET response, so the N-SET latency bounds the commit);
p50/p99 from N-SET COMPLETED sent to the HL7 ORC-5 CM status ACKed by the test RIS; peak RSS of the
broker and of the worker (process trees). Same machine, so wall clocks compare. Targets:
>= 200 MPPS operations/s accepted; p99 event -> state < 500 ms. Missing a target does not change the
exit status; a failed operation, an undelivered status or an error does (1).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hl7_throughput import (  # noqa: E402
    SAMPLE,
    ChildProcess,
    MessageFactory,
    RssSampler,
    _fmt,
    _kill_group,
    _verdict,
    broker_command,
    free_port,
    fresh_database,
    interrupt_on_signals,
    latency_summary,
    machine_facts,
    migrate,
    tree_cpu_seconds,
)

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BROKER_AE = "BROKER"
TARGET_OPS_PER_S = 200.0
TARGET_STATE_P99_MS = 500.0
TARGET_TEXT = (f">= {TARGET_OPS_PER_S:.0f} MPPS operations/s accepted",
               f"p99 N-SET COMPLETED -> state < {TARGET_STATE_P99_MS:.0f} ms")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------------------
# the test RIS


class TestRis:
    """An MLLP listener on 127.0.0.1 (asyncio, in a thread) that ACKs AA and records, per control ID,
    the wall time of every ACK written (a control ID seen twice is a duplicate delivery)."""

    def __init__(self) -> None:
        self.acked: dict[str, list[float]] = {}
        self.messages = 0
        self.lock = threading.Lock()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-ris", daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from broker.hl7.mllp import FrameDecoder, encode_frame

        decoder = FrameDecoder(1 << 20)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    msh = frame.split(b"\r", 1)[0].decode("utf-8", errors="replace").split("|")
                    control = msh[9] if len(msh) > 9 else ""
                    ack = f"MSH|^~\\&|RIS||WLBROKER||20261123||ACK|R{control}|P|2.3.1\rMSA|AA|{control}\r"
                    writer.write(encode_frame(ack.encode()))
                    await writer.drain()
                    now = time.time()
                    with self.lock:
                        self.messages += 1
                        self.acked.setdefault(control, []).append(now)
        writer.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# --------------------------------------------------------------------------------------------------
# processes: redis, broker run, broker worker


@dataclasses.dataclass
class Process(ChildProcess):
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


def spawn(name: str, command: list[str], env: dict[str, str], workdir: Path) -> Process:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Process(name, process, log_path)


def stop(proc: Process) -> str:
    """SIGTERM, then SIGKILL of its process group after STOP_TIMEOUT."""
    how = "exited by itself"
    if proc.alive():
        proc.process.terminate()
        try:
            proc.process.wait(timeout=STOP_TIMEOUT)
            how = "SIGTERM"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.process.wait(timeout=STOP_TIMEOUT)
            how = "SIGKILL"
    _kill_group(proc.pid)  # leftovers of its group (Celery pool processes)
    return how


def wait_for_port(proc: Process, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with status {proc.process.returncode}:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not listen on {port} in {START_TIMEOUT:.0f} s:\n{proc.log_tail()}")
        time.sleep(0.1)


def start_redis(workdir: Path) -> tuple[Process, str]:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed; give --redis-url")
    port = free_port()
    proc = spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(workdir)], dict(os.environ), workdir)
    wait_for_port(proc, port)
    return proc, f"redis://127.0.0.1:{port}/0"


def broker_env(database_url: str, redis_url: str, ris_port: int, hl7_port: int, dicom_port: int,
               log_level: str = "WARNING") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_DATABASE_URL=database_url, BROKER_REDIS_URL=redis_url,
               BROKER_RIS_HL7_ADDRESS=f"127.0.0.1:{ris_port}", BROKER_HL7_HOST="127.0.0.1",
               BROKER_HL7_PORT=str(hl7_port), BROKER_DICOM_HOST="127.0.0.1", BROKER_DICOM_PORT=str(dicom_port),
               BROKER_HTTP_PORT=str(free_port()),
               BROKER_AE_TITLE=BROKER_AE, BROKER_LOG_LEVEL=log_level, BROKER_LOG_FORMAT="json")
    return env


# --------------------------------------------------------------------------------------------------
# orders over HL7


@dataclasses.dataclass(frozen=True)
class Step:
    index: int
    study_uid: str
    sps_id: str
    accession: str
    procedure_pk: int
    patient_id: str


def place_orders(hl7_port: int, count: int, database_url: str) -> tuple[list[Step], float]:
    """Sends ``count`` new orders over one MLLP connection; returns the steps they scheduled and the seconds."""
    from sqlalchemy import select

    from broker.hl7.mllp_client import MLLPClient
    from broker.store.session import make_engine
    from broker.store.tables import ScheduledStep, table_of

    messages = MessageFactory(SAMPLE.read_bytes()).build(count)
    started = time.perf_counter()
    with MLLPClient("127.0.0.1", hl7_port, timeout=30) as client:
        for message in messages:
            reply = client.send(message)
            if b"MSA|AA" not in reply:
                raise RuntimeError(f"order not accepted: {reply[:300]!r}")
    seconds = time.perf_counter() - started
    steps = table_of(ScheduledStep)
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as db:
            found = list(db.execute(select(steps).order_by(steps.c.id)))
    finally:
        engine.dispose()
    if len(found) != count:
        raise RuntimeError(f"{count} orders placed, {len(found)} scheduled steps stored")
    return [Step(i, r.study_instance_uid, r.sps_id, r.accession_number, r.procedure_fk, r.patient_id)
            for i, r in enumerate(found)], seconds


# --------------------------------------------------------------------------------------------------
# MPPS clients


def _create_dataset(step: Step) -> Any:
    from pydicom import Dataset

    ds = Dataset()
    item = Dataset()
    item.StudyInstanceUID = step.study_uid
    item.ScheduledProcedureStepID = step.sps_id
    item.AccessionNumber = step.accession
    item.RequestedProcedureID = ""
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = "BENCH^MPPS"
    ds.PatientID = step.patient_id
    ds.PerformedProcedureStepID = f"PPS{step.index}"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedStationName = ""
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20261123"
    ds.PerformedProcedureStepStartTime = "093000"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = ""
    ds.PerformedSeriesSequence = []
    return ds


def _completed_dataset(images: int = 3) -> Any:
    from pydicom import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = "20261123"
    ds.PerformedProcedureStepEndTime = "094500"
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    series.Modality = "CT"
    series.RetrieveAETitle = "ARCHIVE"
    series.SeriesDescription = ""
    series.PerformingPhysicianName = ""
    series.ProtocolName = "BENCH"
    series.OperatorsName = ""
    refs = []
    for _ in range(images):
        image = Dataset()
        image.ReferencedSOPClassUID = CT_IMAGE
        image.ReferencedSOPInstanceUID = generate_uid()
        refs.append(image)
    series.ReferencedImageSequence = refs
    series.ReferencedNonImageCompositeSOPInstanceSequence = []
    ds.PerformedSeriesSequence = [series]
    return ds


# one pair: (index, create sent, create answered, create status, set sent, set answered, set status), wall times
PairResult = tuple[int, float, float, int, float, float, int]


def run_client(port: int, steps: list[Step], start_at: float, timeout: float) -> tuple[list[PairResult], list[str]]:
    """One MPPS SCU on one association: the pairs of ``steps`` back to back, from wall time ``start_at``."""
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    ae = AE(ae_title="CT01")
    ae.add_requested_context(MPPS_SOP_CLASS)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    prepared = [(step, generate_uid(), _create_dataset(step), _completed_dataset()) for step in steps]
    results: list[PairResult] = []
    errors: list[str] = []
    time.sleep(max(0.0, start_at - time.time()))
    assoc = None
    for step, uid, create, final in prepared:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title=BROKER_AE)
            if not assoc.is_established:
                errors.append("association not established")
                assoc = None
                continue
        t0 = time.time()
        code_create = _request(assoc, "create", create, uid)
        t1 = t2 = time.time()
        code_set = _request(assoc, "set", final, uid) if assoc.is_established else -1
        t3 = time.time()
        if (code_create, code_set) != (0, 0):
            state = "aborted" if assoc.is_aborted else "open" if assoc.is_established else "closed"
            errors.append(f"pair {step.index}: N-CREATE {_code(code_create)}, N-SET {_code(code_set)} "
                          f"(association {state} after {t3 - t0:.2f} s)")
        results.append((step.index, t0, t1, code_create, t2, t3, code_set))
    if assoc is not None and assoc.is_established:
        assoc.release()
    return results, errors


class RawMppsClient:
    """A minimal blocking MPPS SCU: pre-encoded requests written to a socket, the status read back.

    pynetdicom as the SCU costs ~7 ms of CPU per operation (its polling threads) on the same two cores
    as the broker; a modality is another machine. This client spends almost nothing, so the numbers
    are the broker's. Its bytes are built here (not with the broker's codec), Explicit VR Little Endian.
    """

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.message_id = 0

    def associate(self) -> None:
        from bench.mwl_clients import _item, _uid

        context = bytes([1, 0, 0, 0]) + _item(0x30, _uid(MPPS_SOP_CLASS)) + _item(0x40, _uid(EXPLICIT_VR_LE))
        user = _item(0x51, struct.pack(">I", 65536)) + _item(0x52, _uid("1.2.826.0.1.3680043.8.498.1"))
        body = (struct.pack(">HH", 1, 0) + BROKER_AE.encode().ljust(16) + b"CT01".ljust(16) + bytes(32)
                + _item(0x10, _uid("1.2.840.10008.3.1.1.1")) + _item(0x20, context) + _item(0x50, user))
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
        kind, _ = self._read_pdu(sock)
        if kind != 0x02:
            sock.close()
            raise ConnectionError(f"association not accepted (PDU type {kind})")
        self.sock = sock

    def _read_pdu(self, sock: socket.socket) -> tuple[int, bytes]:
        header = self._read(sock, 6)
        kind, _, length = struct.unpack(">BBI", header)
        return kind, self._read(sock, length)

    @staticmethod
    def _read(sock: socket.socket, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return bytes(data)

    def request(self, command_field: int, uid: str, data_set: bytes) -> int:
        """Send one N-CREATE (0x0140) or N-SET (0x0120) and return the response status (-1: none)."""
        from bench.mwl_clients import _element, _uid, command_status, pdv_header

        assert self.sock is not None
        self.message_id += 1
        create = command_field == 0x0140
        body = (_element(0x0000, 0x0002 if create else 0x0003, _uid(MPPS_SOP_CLASS))
                + _element(0x0000, 0x0100, struct.pack("<H", command_field))
                + _element(0x0000, 0x0110, struct.pack("<H", self.message_id))
                + _element(0x0000, 0x0800, struct.pack("<H", 0x0000))
                + _element(0x0000, 0x1000 if create else 0x1001, _uid(uid)))
        command = _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body
        self.sock.sendall(pdv_header(1, 0x03, len(command)) + command + pdv_header(1, 0x02, len(data_set))
                          + data_set)
        command_bytes = b""
        command_done = needs_data = data_done = False
        while not (command_done and (data_done or not needs_data)):  # the response, and its data set if any
            kind, pdu_body = self._read_pdu(self.sock)
            if kind != 0x04:
                raise ConnectionError(f"PDU type {kind} instead of a response")
            offset = 0
            while offset < len(pdu_body):
                length = struct.unpack(">I", pdu_body[offset:offset + 4])[0]
                control = pdu_body[offset + 5]
                if control & 0x01:
                    command_bytes += pdu_body[offset + 6:offset + 4 + length]
                    if control & 0x02:
                        command_done = True
                        needs_data = _data_set_type(command_bytes) != struct.pack("<H", 0x0101)
                elif control & 0x02:
                    data_done = True
                offset += 4 + length
        status = command_status(command_bytes)
        return -1 if status is None else status

    def release(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))
                self._read_pdu(self.sock)
            self.sock.close()
            self.sock = None


def _data_set_type(command: bytes) -> bytes:
    """The value of Command Data Set Type (0000,0800) in an Implicit VR LE command set."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack("<HHI", command[offset:offset + 8])
        if (group, element) == (0x0000, 0x0800):
            return command[offset + 8:offset + 8 + length]
        offset += 8 + length
    return b""


def run_raw_client(port: int, steps: list[Step], start_at: float, timeout: float
                   ) -> tuple[list[PairResult], list[str]]:
    """:func:`run_client` with :class:`RawMppsClient`: the same pairs, requests encoded beforehand."""
    from pydicom.uid import generate_uid
    from pynetdicom.dsutils import encode

    def encoded(dataset: Any) -> bytes:
        data = encode(dataset, False, True)
        assert data is not None, "dataset not encodable"
        return bytes(data)

    prepared = [(step, str(generate_uid()), encoded(_create_dataset(step)), encoded(_completed_dataset()))
                for step in steps]
    results: list[PairResult] = []
    errors: list[str] = []
    time.sleep(max(0.0, start_at - time.time()))
    client = RawMppsClient(port, timeout)
    for step, uid, create, final in prepared:
        try:
            if client.sock is None:
                client.associate()
            t0 = time.time()
            code_create = client.request(0x0140, uid, create)
            t1 = t2 = time.time()
            code_set = client.request(0x0120, uid, final)
            t3 = time.time()
        except (OSError, ConnectionError) as exc:
            errors.append(f"pair {step.index}: {type(exc).__name__}: {exc}")
            client.release()
            continue
        if (code_create, code_set) != (0, 0):
            errors.append(f"pair {step.index}: N-CREATE {_code(code_create)}, N-SET {_code(code_set)}")
        results.append((step.index, t0, t1, code_create, t2, t3, code_set))
    client.release()
    return results, errors


def _request(assoc: Any, kind: str, dataset: Any, uid: str) -> int:
    """One N-CREATE / N-SET; its status, or -1 without a response (aborted, timed out, not established)."""
    try:
        if kind == "create":
            status, _ = assoc.send_n_create(dataset, MPPS_SOP_CLASS, uid)
        else:
            status, _ = assoc.send_n_set(dataset, MPPS_SOP_CLASS, uid)
    except RuntimeError:  # the association went away before the request
        return -1
    return int(status.Status) if status and "Status" in status else -1


def _code(status: int) -> str:
    return "no response" if status < 0 else f"0x{status:04X}"


def _client_group(port: int, groups: list[list[Step]], start_at: float, timeout: float, kind: str = "raw"
                  ) -> tuple[list[PairResult], list[str], float]:
    """Several clients as threads of this process; returns their results and this process's CPU seconds."""
    # Imported here, once, before the threads: ten threads importing pydicom for the first time at once
    # can meet its modules half initialised ("partially initialized module 'pydicom'").
    import pydicom.dataset  # noqa: F401
    import pynetdicom.dsutils  # noqa: F401

    cpu = time.process_time()
    outcomes: list[tuple[list[PairResult], list[str]]] = []
    lock = threading.Lock()

    def one(group: list[Step]) -> None:
        try:
            client = run_raw_client if kind == "raw" else run_client
            outcome = client(port, group, start_at, timeout)
        except Exception as exc:  # a client that died: its pairs count as failed
            outcome = ([], [f"client failed: {type(exc).__name__}: {exc}"])
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=one, args=(g,)) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [r for rs, _ in outcomes for r in rs]
    errors = [e for _, es in outcomes for e in es]
    return results, errors, time.process_time() - cpu


def run_clients(port: int, steps: list[Step], clients: int, mode: str, processes: int, timeout: float,
                kind: str = "raw") -> tuple[list[PairResult], list[str], float]:
    """All pairs over ``clients`` SCUs (threads here, or threads in ``processes`` spawned processes)."""
    groups = [steps[i::clients] for i in range(clients)]
    if mode == "threads":
        return _client_group(port, groups, time.time() + 0.5, timeout, kind)
    per_process = [groups[i::processes] for i in range(processes)]
    start_at = time.time() + 5.0  # spawned interpreters import pynetdicom first
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        futures = [pool.submit(_client_group, port, g, start_at, timeout, kind) for g in per_process if g]
        parts = [f.result() for f in futures]
    return ([r for rs, _, _ in parts for r in rs], [e for _, es, _ in parts for e in es],
            sum(cpu for _, _, cpu in parts))


# --------------------------------------------------------------------------------------------------
# measuring


def outbox_state(database_url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from broker.store.session import make_engine
    from broker.store.tables import OutboxEvent, table_of

    outbox = table_of(OutboxEvent)
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as db:
            return {f"{kind}:{status}": n for kind, status, n in db.execute(
                select(outbox.c.kind, outbox.c.status, func.count()).group_by(outbox.c.kind, outbox.c.status))}
    finally:
        engine.dispose()


def drain(database_url: str, timeout: float) -> tuple[bool, float, dict[str, int]]:
    """Wait until no ris.status event is pending or running; returns (drained, seconds, counts)."""
    started = time.monotonic()
    while True:
        counts = outbox_state(database_url)
        busy = sum(n for key, n in counts.items() if key.startswith("ris.status:") and not key.endswith(":done"))
        if not busy:
            return True, time.monotonic() - started, counts
        if time.monotonic() - started > timeout:
            return False, time.monotonic() - started, counts
        time.sleep(0.5)


def pipeline_latencies(database_url: str, steps: list[Step], pairs: dict[int, PairResult],
                       ris: TestRis) -> dict[str, Any]:
    """N-SET sent -> COMPLETED transition stamped, and -> CM status ACKed by the RIS, per pair."""
    from sqlalchemy import select

    from broker.outbound.ris_hl7 import control_id
    from broker.store.session import make_engine
    from broker.store.tables import OutboxEvent, ProcedureTransition, table_of

    transitions = table_of(ProcedureTransition)
    outbox = table_of(OutboxEvent)
    by_procedure = {s.procedure_pk: s.index for s in steps}
    by_accession = {s.accession: s.index for s in steps}
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as db:
            completed = {r.procedure_fk: r.at for r in db.execute(
                select(transitions.c.procedure_fk, transitions.c.at).where(transitions.c.to_state == "COMPLETED"))}
            statuses = list(db.execute(select(outbox.c.event_id, outbox.c.payload)
                                       .where(outbox.c.kind == "ris.status")))
    finally:
        engine.dispose()
    to_state: list[float] = []
    for procedure_pk, at in completed.items():
        index = by_procedure.get(procedure_pk)
        if index is not None and index in pairs:
            to_state.append(at.timestamp() - pairs[index][4])
    to_ris: list[float] = []
    duplicates = 0
    with ris.lock:
        acked = {k: list(v) for k, v in ris.acked.items()}
    for event_id, payload in statuses:
        times = acked.get(control_id(event_id), [])
        duplicates += max(0, len(times) - 1)
        if payload.get("order_status") != "CM" or not times:
            continue
        index = by_accession.get(payload.get("accession_number", ""))
        if index is not None and index in pairs:
            to_ris.append(min(times) - pairs[index][4])
    return {"to_state": to_state, "to_ris": to_ris, "status_events": len(statuses),
            "ris_messages": ris.messages, "ris_control_ids": len(acked), "ris_duplicates": duplicates,
            "completed_transitions": len(completed)}


# --------------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mpps-bench-"))
    processes: list[Process] = []
    samplers: list[RssSampler] = []
    ris = TestRis()
    result: dict[str, Any] = {}
    report["result"] = result
    try:
        with fresh_database(args.backend, args.pg_url, workdir) as database_url:
            migrate(database_url)
            ris.start()
            redis_url = args.redis_url
            if not redis_url:
                redis, redis_url = start_redis(workdir)
                processes.append(redis)
            hl7_port, dicom_port = free_port(), free_port()
            env = broker_env(database_url, redis_url, ris.port, hl7_port, dicom_port, args.log_level)
            broker = spawn("broker", [*broker_command(), "run"], env, workdir)
            processes.append(broker)
            worker = spawn("worker", [*broker_command(), "worker", "--concurrency", str(args.worker_concurrency)],
                           env, workdir)
            processes.append(worker)
            wait_for_port(broker, hl7_port)
            wait_for_port(broker, dicom_port)
            samplers = [RssSampler(broker.pid), RssSampler(worker.pid)]
            for sampler in samplers:
                sampler.start()
            print(f"placing {args.pairs} orders over HL7 ...", flush=True)
            steps, order_seconds = place_orders(hl7_port, args.pairs, database_url)
            result["orders_per_s"] = args.pairs / order_seconds
            # the orders send no status to the RIS (it sent them); start the MPPS load from a quiet broker
            time.sleep(1.0)
            print(f"{args.clients} MPPS clients ({args.client}, {args.client_mode}), "
                  f"{args.pairs} create+complete pairs ...",
                  flush=True)
            cpu_before = time.process_time()
            cpu_at_start = {"broker": tree_cpu_seconds(broker.pid), "worker": tree_cpu_seconds(worker.pid)}
            pair_results, errors, client_cpu = run_clients(dicom_port, steps, args.clients, args.client_mode,
                                                           args.client_processes, args.dimse_timeout, args.client)
            if args.client_mode == "threads":
                client_cpu = time.process_time() - cpu_before
            pairs = {p[0]: p for p in pair_results}
            ok_ops = sum((p[3] == 0) + (p[6] == 0) for p in pair_results)
            first = min((p[1] for p in pair_results), default=0.0)
            last = max((p[5] for p in pair_results), default=0.0)
            wall = max(last - first, 1e-9)
            # while all clients are busy: up to the moment the first one is done (a client held up by a
            # lost response stretches the whole run's wall time, not the broker's rate)
            ends = [max(p[5] for p in pair_results if p[0] % args.clients == c)
                    for c in range(args.clients) if any(p[0] % args.clients == c for p in pair_results)]
            all_busy = min(ends, default=last)
            busy_ops = sum((p[3] == 0 and p[2] <= all_busy) + (p[6] == 0 and p[5] <= all_busy) for p in pair_results)
            print("waiting for the status messages to drain ...", flush=True)
            drained, drain_seconds, counts = drain(database_url, args.drain_timeout)
            # CPU per accepted operation, load and drain together: what each process spends on the work
            # (less noisy than the rates on a shared machine)
            cpu_ms_per_op = {name: ((tree_cpu_seconds(proc.pid) or 0.0) - (cpu_at_start[name] or 0.0)) * 1000
                             / max(ok_ops, 1) for name, proc in (("broker", broker), ("worker", worker))}
            time.sleep(0.5)
            latencies = pipeline_latencies(database_url, steps, pairs, ris)
            result.update({
                "pairs": args.pairs, "clients": args.clients, "client_mode": args.client_mode, "client": args.client,
                "client_processes": args.client_processes if args.client_mode == "processes" else 1,
                "worker_concurrency": args.worker_concurrency,
                "ok_operations": ok_ops, "failed_operations": 2 * args.pairs - ok_ops, "errors": errors,
                "wall_s": wall, "ops_per_s": ok_ops / wall, "client_cpu_s": client_cpu,
                "ops_per_s_all_clients_busy": busy_ops / max(all_busy - first, 1e-9),
                "all_clients_busy_s": all_busy - first,
                "n_create": latency_summary([p[2] - p[1] for p in pair_results if p[3] == 0]),
                "n_set": latency_summary([p[5] - p[4] for p in pair_results if p[6] == 0]),
                "set_to_state": latency_summary(latencies.pop("to_state")),
                "set_to_ris_ack": latency_summary(latencies.pop("to_ris")),
                "drained": drained, "drain_after_load_s": drain_seconds, "outbox": counts, **latencies,
                "cpu_ms_per_op": cpu_ms_per_op,
                "peak_rss_mb": {"broker": samplers[0].peaks_mb(overall=True)["tree"],
                                "worker": samplers[1].peaks_mb(overall=True)["tree"],
                                "worker_processes": samplers[1].max_processes},
            })
            for sampler in samplers:
                sampler.stop()
            for proc in reversed(processes):
                result.setdefault("stopped", {})[proc.name] = stop(proc)
            if errors or not drained:
                keep_logs(processes, report)
            processes = []
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"error: {result['error']}", flush=True)
        for proc in processes:
            print(f"--- {proc.name} log ---\n{proc.log_tail()}", flush=True)
        keep_logs(processes, report)
    finally:
        for sampler in samplers:
            sampler.stop()
        for proc in reversed(processes):
            stop(proc)
        ris.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def keep_logs(processes: list[Process], report: dict[str, Any]) -> None:
    """Copy the logs of a run that went wrong next to its JSON (the work directory is removed)."""
    target = Path(report["json"]).with_suffix("")
    target.parent.mkdir(parents=True, exist_ok=True)
    for proc in processes:
        with contextlib.suppress(OSError):
            shutil.copyfile(proc.log_path, f"{target}-{proc.name}.log")
            report.setdefault("logs", []).append(f"{target}-{proc.name}.log")


def verdicts(result: dict[str, Any]) -> tuple[bool | None, bool | None]:
    if "ops_per_s" not in result:
        return None, None
    return result["ops_per_s"] >= TARGET_OPS_PER_S, result["set_to_state"]["p99_ms"] < TARGET_STATE_P99_MS


def print_report(report: dict[str, Any]) -> None:
    facts, r = report["machine"], report["result"]
    print(f"\nmachine: nproc {facts['nproc']}, {facts['cpu_model'] or 'cpu ?'}, Python {facts['python']}, "
          f"calibration (10M-iteration loop) {facts['calibration_loop_10m_s']:.3f} s")
    if "error" in r:
        print(f"FAILED: {r['error']}")
    if "ops_per_s" not in r:
        return
    print(f"{r['pairs']} pairs, {r['clients']} clients ({r['client_mode']}, {r['client_processes']} process(es)), "
          f"backend {report['settings']['backend']}, worker concurrency {r['worker_concurrency']}; "
          f"orders placed at {r['orders_per_s']:.0f}/s")
    print(f"{'measure':<34} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for label, key in (("N-CREATE response", "n_create"), ("N-SET response", "n_set"),
                       ("N-SET COMPLETED -> state", "set_to_state"), ("N-SET COMPLETED -> RIS ACK (CM)",
                                                                      "set_to_ris_ack")):
        s = r[key]
        print(f"{label:<34} {_fmt(s['p50_ms']):>9} {_fmt(s['p99_ms']):>9} {_fmt(s['max_ms']):>9}")
    print(f"MPPS operations accepted: {r['ok_operations']} of {2 * r['pairs']} in {r['wall_s']:.2f} s = "
          f"{r['ops_per_s']:.0f}/s (client CPU {r['client_cpu_s']:.1f} s); while all {r['clients']} clients were "
          f"busy ({r['all_clients_busy_s']:.1f} s): {r['ops_per_s_all_clients_busy']:.0f}/s")
    print(f"status events {r['status_events']}, RIS messages {r['ris_messages']} "
          f"({r['ris_control_ids']} control IDs, {r['ris_duplicates']} repeats), drained: {r['drained']} "
          f"({r['drain_after_load_s']:.1f} s after the load), outbox {r['outbox']}")
    if "cpu_ms_per_op" in r:
        clients_ms = 1000 * r["client_cpu_s"] / max(r["ok_operations"], 1)
        print(f"CPU per accepted operation (load + drain): broker {r['cpu_ms_per_op']['broker']:.2f} ms, "
              f"worker {r['cpu_ms_per_op']['worker']:.2f} ms, clients and test RIS {clients_ms:.2f} ms")
    print(f"peak RSS: broker {r['peak_rss_mb']['broker']:.0f} MB, worker {r['peak_rss_mb']['worker']:.0f} MB "
          f"({r['peak_rss_mb']['worker_processes']} processes)")
    if r["errors"]:
        print(f"{len(r['errors'])} problem(s), the first ones:")
    for error in r["errors"][:5]:
        print(f"  {error}")
    throughput_ok, state_ok = verdicts(r)
    print(f"{_verdict(throughput_ok)}  {TARGET_TEXT[0]}: {r['ops_per_s']:.0f}/s")
    print(f"{_verdict(state_ok)}  {TARGET_TEXT[1]}: {r['set_to_state']['p99_ms']:.1f} ms")
    print(f"results: {report['json']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=1000, help="MPPS create+complete pairs (= orders placed)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent MPPS SCUs")
    parser.add_argument("--quick", action="store_true", help="100 pairs: a check that everything works")
    parser.add_argument("--client-mode", choices=("threads", "processes"), default="threads",
                        help="the SCUs as threads of this process, or spread over --client-processes processes")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--client", choices=("raw", "pynetdicom"), default="raw",
                        help="raw: a minimal SCU with pre-encoded requests (default; the CPU is the broker's); "
                             "pynetdicom: its AE as SCU (~7 ms of client CPU per operation on the same cores)")
    parser.add_argument("--worker-concurrency", type=int, default=2,
                        help="pool processes of the one 'broker worker' (its default: 2)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="server to create a fresh bench_* database on")
    parser.add_argument("--redis-url", default="", help="an existing Redis (default: a dedicated redis-server)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait after the load for every status message to be done")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default bench/results/mpps-<timestamp>.json)")
    parser.add_argument("--dimse-timeout", type=float, default=10.0,
                        help="seconds an SCU waits for a response before it aborts and re-associates")
    parser.add_argument("--log-level", default="WARNING", help="BROKER_LOG_LEVEL of the broker and the worker")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs = 100
    if args.pairs < args.clients or args.clients < 1:
        parser.error("--pairs must be >= --clients >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path: Path = args.json or ROOT / "bench" / "results" / f"mpps-{stamp}.json"
    print("calibrating ...", flush=True)
    report: dict[str, Any] = {
        "benchmark": "mpps_pipeline", "started": started.isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": {"throughput": TARGET_TEXT[0], "latency": TARGET_TEXT[1]},
        "machine": machine_facts(), "json": str(json_path),
    }
    try:
        run(args, report)
    except KeyboardInterrupt:
        report.setdefault("result", {})["error"] = "interrupted"
    r = report["result"]
    r_failed = ("error" in r or r.get("failed_operations", 1) > 0 or not r.get("drained", False)
                or r.get("ris_control_ids", 0) < r.get("status_events", 1))
    report["failed"] = r_failed
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print_report(report)
    return 1 if r_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
