"""C-FIND clients of the MWL benchmark: DCMTK ``findscu`` and a minimal asyncio DICOM client.

Every query is what a modality does: open an association, one C-FIND, release. Both clients count the
pending responses (the matches) and report the latency from "connect" to "released".

``findscu`` is the default client as a modality in the field would connect: one process per query, Nagle's
algorithm on (DCMTK's default; ``TCP_NODELAY=1`` in its environment turns it off). Its latency is taken from
its own log, not from the process: a timestamp is logged when it requests the association (after ~20 ms of
process start and data dictionary loading on a 2-core machine), and the latency runs from there until the
process has exited (release plus process exit, well under 1 ms). The wall time of the whole process is kept
as well.

``raw`` is a load generator for the concurrency runs: it sends the same identifier, writes its PDUs in
the same pieces as DCMTK 3.6.7 (PDU + PDV header in one write, the PDV value in another, for the command
and again for the identifier), with Nagle's algorithm on (``nodelay`` off) or off, and only counts what
comes back (no dataset is decoded). It costs well under 1 ms of CPU per query, where a findscu process costs
~25 ms and a pynetdicom association 30 ms (typical query) to 170 ms (196 matches): on two cores either of
those would take the CPU the server needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

MWL_FIND = "1.2.840.10008.5.1.4.31"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.543.9.1"
IMPLEMENTATION_VERSION = "MWLBENCH_1"
MAX_PDU = 16384  # what findscu offers by default
PENDING = (0xFF00, 0xFF01)
STATUS_TAG = (0x0000, 0x0900)
CLIENT_TIMEOUT = 120.0

FINDSCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%Q} %m%n
"""
_TIMESTAMPED = re.compile(r"^(\d+)\.(\d+\.\d+) (.*)$")


@dataclass
class Outcome:
    """One query: matches received, latency in seconds (NaN if it failed), the error if any."""

    matches: int
    latency: float
    error: str = ""
    process_wall: float = float("nan")  # findscu only: spawn -> exit


# --------------------------------------------------------------------------------------------------
# findscu


class Findscu:
    """Runs ``findscu -W`` per query with a log configuration that timestamps each line."""

    def __init__(self, workdir: Path, identifier: Dataset, name: str) -> None:
        self.query_file = workdir / f"query-{name}.dcm"
        ds = identifier.copy()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(MWL_FIND)
        meta.MediaStorageSOPInstanceUID = UID(f"{IMPLEMENTATION_CLASS_UID}.{os.getpid()}")
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(self.query_file, enforce_file_format=True)
        self.log_config = workdir / "findscu-log.cfg"
        self.log_config.write_text(FINDSCU_LOG_CONFIG, encoding="ascii")

    def command(self, port: int, calling_ae: str, called_ae: str) -> list[str]:
        # -sr: no dataset dumps (only "Find Response: N (Pending)" lines); -to: connect timeout.
        return ["findscu", "-lc", str(self.log_config), "-sr", "-W", "-to", "30", "-aet", calling_ae,
                "-aec", called_ae, "127.0.0.1", str(port), str(self.query_file)]

    def query(self, port: int, calling_ae: str, called_ae: str, nodelay: bool) -> Outcome:
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        if nodelay:
            env["TCP_NODELAY"] = "1"
        spawned = time.time()
        try:
            done = subprocess.run(self.command(port, calling_ae, called_ae), env=env, capture_output=True,
                                  text=True, errors="replace", timeout=CLIENT_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return Outcome(0, float("nan"), f"findscu timed out after {CLIENT_TIMEOUT:.0f} s")
        exited = time.time()
        return parse_findscu(done.stdout + done.stderr, done.returncode, spawned, exited)


def parse_findscu(output: str, returncode: int, spawned: float, exited: float) -> Outcome:
    """Matches, latency (association requested -> process exited) and any error from findscu's log."""
    requested = None
    matches = 0
    final = False
    problems = []
    for line in output.splitlines():
        found = _TIMESTAMPED.match(line)
        if not found:
            continue
        message = found.group(3)
        if message.startswith("Requesting Association"):
            requested = int(found.group(1)) + float(found.group(2)) / 1000.0
        elif "Find Response" in message and "(Pending" in message:
            matches += 1
        elif message.startswith("Received Final Find Response"):
            final = True
            if "(Success)" not in message:
                problems.append(message)
        elif message.startswith(("E:", "F:")) or "Association Rejected" in message or "Abort" in message:
            problems.append(message)
    if returncode != 0 or not final or requested is None:
        detail = problems[0] if problems else (output.strip().splitlines() or ["no output"])[-1]
        return Outcome(matches, float("nan"), f"findscu exit {returncode}: {detail[:300]}", exited - spawned)
    return Outcome(matches, exited - requested, "; ".join(problems)[:300], exited - spawned)


# --------------------------------------------------------------------------------------------------
# raw: the minimal asyncio client


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def associate_rq(calling_ae: str, called_ae: str) -> bytes:
    """A-ASSOCIATE-RQ for MWL FIND, Explicit VR LE then Implicit VR LE (findscu's default proposal)."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, _uid(MWL_FIND)) + _item(0x40, _uid(ExplicitVRLittleEndian)) \
        + _item(0x40, _uid(ImplicitVRLittleEndian))
    user = _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID)) \
        + _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    body = struct.pack(">HH", 1, 0) + called_ae.encode("ascii").ljust(16) + calling_ae.encode("ascii").ljust(16) \
        + bytes(32) + _item(0x10, _uid(APPLICATION_CONTEXT)) + _item(0x20, context) + _item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _element(group: int, elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", group, elem, len(value)) + value


def find_command(message_id: int = 1) -> bytes:
    """The C-FIND-RQ command set, Implicit VR Little Endian, with its group length."""
    body = (_element(0x0000, 0x0002, _uid(MWL_FIND)) + _element(0x0000, 0x0100, struct.pack("<H", 0x0020))
            + _element(0x0000, 0x0110, struct.pack("<H", message_id)) + _element(0x0000, 0x0700, b"\0\0")
            + _element(0x0000, 0x0800, struct.pack("<H", 0x0001)))
    return _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def pdv_header(context_id: int, control: int, value_length: int) -> bytes:
    """P-DATA-TF PDU header and one PDV header (12 bytes; DCMTK writes these apart from the value)."""
    return struct.pack(">BBIIBB", 0x04, 0, value_length + 6, value_length + 2, context_id, control)


RELEASE_RQ = struct.pack(">BBII", 0x05, 0, 4, 0)


def encode_identifier(identifier: Dataset, implicit: bool) -> bytes:
    from pynetdicom.dsutils import encode

    encoded = encode(identifier, implicit, True)
    assert encoded is not None
    return bytes(encoded)


class RawQuery:
    """Pre-encoded bytes of one query for one server."""

    def __init__(self, identifier: Dataset, calling_ae: str, called_ae: str) -> None:
        self.associate = associate_rq(calling_ae, called_ae)
        self.command = find_command()
        self.identifier: dict[str, bytes] = {str(ExplicitVRLittleEndian): encode_identifier(identifier, False),
                                             str(ImplicitVRLittleEndian): encode_identifier(identifier, True)}


class ProtocolError(Exception):
    pass


async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(6)
    kind, _, length = struct.unpack(">BBI", header)
    return kind, await reader.readexactly(length)


def _accepted_syntax(body: bytes) -> str:
    """The transfer syntax the A-ASSOCIATE-AC accepted for presentation context 1."""
    offset = 68
    while offset + 4 <= len(body):
        kind, _, length = struct.unpack(">BBH", body[offset:offset + 4])
        value = body[offset + 4:offset + 4 + length]
        if kind == 0x21:
            result = value[2]
            if result != 0:
                raise ProtocolError(f"presentation context rejected (result {result})")
            sub_kind, _, sub_length = struct.unpack(">BBH", value[4:8])
            if sub_kind == 0x40:
                return value[8:8 + sub_length].decode("ascii").rstrip("\0 ")
        offset += 4 + length
    raise ProtocolError("no accepted presentation context")


def command_status(command: bytes) -> int | None:
    """Status (0000,0900) of an Implicit VR LE command set."""
    offset = 0
    while offset + 8 <= len(command):
        group, elem, length = struct.unpack("<HHI", command[offset:offset + 8])
        if (group, elem) == STATUS_TAG:
            return int(struct.unpack("<H", command[offset + 8:offset + 10])[0])
        offset += 8 + length
    return None


_ABORT_KINDS = {0x03: "A-ASSOCIATE-RJ", 0x07: "A-ABORT"}


async def raw_query(port: int, query: RawQuery, nodelay: bool) -> Outcome:
    """One association, one C-FIND, release. Nagle's algorithm stays on unless ``nodelay``."""
    started = time.perf_counter()
    writer = None
    matches = 0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        # asyncio turns Nagle off on every TCP socket; a modality's DCMTK stack leaves it on.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        writer.write(query.associate)
        kind, body = await _read_pdu(reader)
        if kind != 0x02:
            raise ProtocolError(f"{_ABORT_KINDS.get(kind, f'PDU type {kind}')} instead of A-ASSOCIATE-AC")
        syntax = _accepted_syntax(body)
        identifier = query.identifier.get(syntax)
        if identifier is None:
            raise ProtocolError(f"accepted transfer syntax {syntax} was not proposed")
        # Header and value in separate writes, as DCMTK does: with Nagle on, the value waits for the ACK.
        writer.write(pdv_header(1, 0x03, len(query.command)))
        writer.write(query.command)
        writer.write(pdv_header(1, 0x02, len(identifier)))
        writer.write(identifier)
        command = b""
        final: int | None = None
        while final is None:
            kind, body = await _read_pdu(reader)
            if kind != 0x04:
                raise ProtocolError(f"{_ABORT_KINDS.get(kind, f'PDU type {kind}')} during C-FIND")
            for control, value in _pdvs(body):
                if not control & 0x01:
                    continue  # the identifier of a pending response: only counted, never decoded
                command += value
                if not control & 0x02:
                    continue  # more fragments of this command follow
                status = command_status(command)
                command = b""
                if status is None:
                    raise ProtocolError("a C-FIND response without Status")
                if status in PENDING:
                    matches += 1
                else:
                    final = status
        if final != 0x0000:
            raise ProtocolError(f"C-FIND final status 0x{final:04X} after {matches} matches")
        writer.write(RELEASE_RQ)
        kind, _ = await _read_pdu(reader)
        if kind != 0x06:
            raise ProtocolError(f"{_ABORT_KINDS.get(kind, f'PDU type {kind}')} instead of A-RELEASE-RP")
        latency = time.perf_counter() - started
        return Outcome(matches, latency)
    except (OSError, asyncio.IncompleteReadError, ProtocolError, struct.error, IndexError) as exc:
        return Outcome(matches, float("nan"), f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


def _pdvs(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    offset = 0
    while offset + 6 <= len(body):
        length = struct.unpack(">I", body[offset:offset + 4])[0]
        control = body[offset + 5]
        out.append((control, body[offset + 6:offset + 4 + length]))
        offset += 4 + length
    return out
