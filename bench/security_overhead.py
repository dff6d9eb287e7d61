"""What TLS and the audit trail cost: the same broker measured with and without each, in one run.

Run it by hand from the repository root (it is not a test)::

    .venv/bin/python bench/security_overhead.py                       # both parts, SQLite, 10k items
    .venv/bin/python bench/security_overhead.py --backend postgresql --parts tls --rounds 3

Part ``tls``: one ``broker run`` with a plain and a TLS port for DICOM and for MLLP (mutual TLS, the
certificates made by ``tests/tls_support.py`` in a temporary directory). Series alternate plain / TLS,
``--rounds`` times:

* MWL C-FIND on persistent associations: one client (p50 latency, queries/s) and ``--clients`` clients
  (queries/s), the typical query of ``bench/mwl_items.py`` at ``--items`` items;
* HL7 new orders on one persistent MLLP connection (messages/s, p50);
* the handshake: ``--handshakes`` connections one after the other, each opened, associated (DICOM) or sent
  one message (HL7) and closed; the difference to plain is the TLS handshake's cost.

Part ``audit``: the broker restarted alternately with ``BROKER_AUDIT_ENABLED`` true and false (records stay
in the database: no repository), ``--rounds`` times each:

* MWL C-FIND with 50 clients, each a modality's loop of association + C-FIND + release (queries/s);
* HL7 new orders on one persistent connection (messages/s).

For every series: the rate, latencies, the broker's CPU per operation (its whole process tree, from
/proc) and this client's CPU per operation. Goals (the issue): TLS within 15% of plain on persistent
connections, audit within 10% of no audit. Ratios, not absolute figures, are what carries between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hl7_throughput import (  # noqa: E402
    DEFAULT_PG_URL,
    SAMPLE,
    MessageFactory,
    broker_command,
    free_port,
    fresh_database,
    machine_facts,
    migrate,
    percentile,
    tree_cpu_seconds,
)
from bench.mwl_clients import (  # noqa: E402
    PENDING,
    RELEASE_RQ,
    RawQuery,
    _accepted_syntax,
    _pdvs,
    command_status,
    pdv_header,
    raw_query,
)
from bench.mwl_items import Spread, expected_counts, load_database, queries  # noqa: E402
from tests.tls_support import Pki, make_pki  # noqa: E402

START_TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------------
# the broker


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    dicom: int
    dicom_tls: int
    hl7: int
    hl7_tls: int
    log: Path

    def cpu(self) -> float:
        return tree_cpu_seconds(self.process.pid) or 0.0


def start(url: str, pki: Pki, workdir: Path, audit: bool) -> Running:
    ports = [free_port() for _ in range(4)]
    env = dict(os.environ)
    env.update(pki.broker_env())
    env.update({"BROKER_DATABASE_URL": url, "BROKER_LOG_LEVEL": "WARNING", "BROKER_DICOM_HOST": "127.0.0.1",
                "BROKER_HL7_HOST": "127.0.0.1", "BROKER_HTTP_PORT": "0",
                "BROKER_DICOM_PORT": str(ports[0]), "BROKER_DICOM_TLS_PORT": str(ports[1]),
                "BROKER_HL7_PORT": str(ports[2]), "BROKER_HL7_TLS_PORT": str(ports[3]),
                "BROKER_HL7_TLS_REQUIRE_CLIENT_CERT": "true", "BROKER_DICOM_MAX_ASSOCIATIONS": "200",
                "BROKER_AUDIT_ENABLED": "true" if audit else "false"})
    log = workdir / f"broker-{'audit' if audit else 'noaudit'}-{time.time_ns()}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([*broker_command(), "run"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running = Running(process, ports[0], ports[1], ports[2], ports[3], log)
    deadline = time.monotonic() + START_TIMEOUT
    for port in ports:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"broker exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} not listening: {log.read_text(errors='replace')[-2000:]}") from exc
                time.sleep(0.1)
    time.sleep(1.0)  # let start-up work (UPS status, first relay poll) settle
    return running


def stop(running: Running) -> None:
    running.process.terminate()
    try:
        running.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(running.process.pid, 9)
        running.process.wait(timeout=5)


# --------------------------------------------------------------------------------------------------
# clients


def client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    kind, _, length = struct.unpack(">BBI", await reader.readexactly(6))
    return kind, await reader.readexactly(length)


async def _associate(port: int, query: RawQuery, context: ssl.SSLContext | None
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="localhost" if context else None)
    writer.write(query.associate)
    kind, body = await _read_pdu(reader)
    if kind != 0x02:
        raise RuntimeError(f"PDU type {kind} instead of A-ASSOCIATE-AC")
    return reader, writer, query.identifier[_accepted_syntax(body)]


async def _find(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, query: RawQuery,
                identifier: bytes) -> int:
    writer.write(pdv_header(1, 0x03, len(query.command)) + query.command
                 + pdv_header(1, 0x02, len(identifier)) + identifier)
    matches, command = 0, b""
    while True:
        kind, body = await _read_pdu(reader)
        if kind != 0x04:
            raise RuntimeError(f"PDU type {kind} during C-FIND")
        for control, value in _pdvs(body):
            if not control & 0x01:
                continue
            command += value
            if not control & 0x02:
                continue
            status = command_status(command)
            command = b""
            if status in PENDING:
                matches += 1
            elif status == 0:
                return matches
            else:
                raise RuntimeError(f"C-FIND status {status}")


async def _release(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(RELEASE_RQ)
    await _read_pdu(reader)
    writer.close()
    with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def persistent_finds(port: int, query: RawQuery, context: ssl.SSLContext | None, clients: int,
                           seconds: float, expected: int) -> list[float]:
    """``clients`` associations, each running C-FINDs back to back for ``seconds``; the latencies."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        reader, writer, identifier = await _associate(port, query, context)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            matches = await _find(reader, writer, query, identifier)
            latencies.append(time.perf_counter() - started)
            if matches != expected:
                raise RuntimeError(f"{matches} matches, expected {expected}")
        await _release(reader, writer)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


async def association_per_find(port: int, query: RawQuery, clients: int, seconds: float, expected: int) -> list[float]:
    """``clients`` modalities, each a loop of association + C-FIND + release (plain, as in mwl_query)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            outcome = await raw_query(port, query, nodelay=True)
            if outcome.error or outcome.matches != expected:
                raise RuntimeError(outcome.error or f"{outcome.matches} matches, expected {expected}")
            latencies.append(outcome.latency)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


async def handshakes(port: int, query: RawQuery, context: ssl.SSLContext | None, count: int) -> list[float]:
    """``count`` associations one after the other: connect (+ TLS), associate, release."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        reader, writer, _ = await _associate(port, query, context)
        await _release(reader, writer)
        latencies.append(time.perf_counter() - started)
    return latencies


def _mllp_connect(port: int, context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(sock, server_hostname="localhost") if context else sock


def _mllp_exchange(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(b"\x0b" + message + b"\x1c\r")
    reply = b""
    while not reply.endswith(b"\x1c\r"):
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the ACK")
        reply += chunk
    if b"MSA|AA|" not in reply:
        raise RuntimeError(f"not AA: {reply[:200]!r}")
    return reply


def hl7_series(port: int, context: ssl.SSLContext | None, messages: list[bytes]) -> list[float]:
    """The messages over one persistent connection, one at a time; the round-trip latencies."""
    latencies = []
    with _mllp_connect(port, context) as sock:
        for message in messages:
            started = time.perf_counter()
            _mllp_exchange(sock, message)
            latencies.append(time.perf_counter() - started)
    return latencies


def hl7_handshakes(port: int, context: ssl.SSLContext | None, messages: list[bytes]) -> list[float]:
    latencies = []
    for message in messages:
        started = time.perf_counter()
        with _mllp_connect(port, context) as sock:
            _mllp_exchange(sock, message)
        latencies.append(time.perf_counter() - started)
    return latencies


# --------------------------------------------------------------------------------------------------
# measuring


def _sync(make: Callable[[], Coroutine[Any, Any, list[float]]]) -> Callable[[], list[float]]:
    """A series written as a coroutine, run on its own event loop."""
    return lambda: asyncio.run(make())


def measure(name: str, running: Running, run: Callable[[], list[float]]) -> dict[str, Any]:
    """Run one series; rate, latency percentiles, broker and client CPU per operation."""
    cpu_before, self_before = running.cpu(), _self_cpu()
    started = time.perf_counter()
    latencies = run()
    wall = time.perf_counter() - started
    broker_cpu, client_cpu = running.cpu() - cpu_before, _self_cpu() - self_before
    ordered = sorted(latencies)
    count = len(latencies)
    result = {"series": name, "operations": count, "seconds": round(wall, 3),
              "rate_per_s": round(count / wall, 1) if wall else None,
              "p50_ms": round(percentile(ordered, 50) * 1000, 3), "p99_ms": round(percentile(ordered, 99) * 1000, 3),
              "broker_cpu_ms_per_op": round(broker_cpu / count * 1000, 3) if count else None,
              "client_cpu_ms_per_op": round(client_cpu / count * 1000, 3) if count else None}
    print(f"    {name:<34} {count:>6} ops {result['rate_per_s']:>8} /s  p50 {result['p50_ms']:>7} ms  "
          f"p99 {result['p99_ms']:>8} ms  broker {result['broker_cpu_ms_per_op']} ms/op  "
          f"client {result['client_cpu_ms_per_op']} ms/op", flush=True)
    return result


def tls_part(url: str, pki: Pki, workdir: Path, args: argparse.Namespace, factory: MessageFactory,
             query: RawQuery, expected: int) -> list[dict[str, Any]]:
    context = client_context(pki)
    results: list[dict[str, Any]] = []
    running = start(url, pki, workdir, audit=True)
    try:
        # warm-up: caches, prepared statements, the first handshake
        asyncio.run(persistent_finds(running.dicom, query, None, 1, 1.0, expected))
        asyncio.run(persistent_finds(running.dicom_tls, query, context, 1, 1.0, expected))
        hl7_series(running.hl7, None, factory.build(50))
        hl7_series(running.hl7_tls, context, factory.build(50))
        for round_number in range(args.rounds):
            print(f"  round {round_number + 1}", flush=True)
            for label, dicom_port, hl7_port, ctx in (("plain", running.dicom, running.hl7, None),
                                                      ("tls", running.dicom_tls, running.hl7_tls, context)):
                for clients in (1, args.clients):
                    finds = partial(persistent_finds, dicom_port, query, ctx, clients, args.seconds, expected)
                    results.append(measure(f"{label} C-FIND persistent x{clients}", running, _sync(finds)))
                results.append(measure(f"{label} HL7 one connection", running,
                                       partial(hl7_series, hl7_port, ctx, factory.build(args.hl7_messages))))
                associations = partial(handshakes, dicom_port, query, ctx, args.handshakes)
                results.append(measure(f"{label} DICOM association only", running, _sync(associations)))
                results.append(measure(f"{label} HL7 connection per message", running,
                                       partial(hl7_handshakes, hl7_port, ctx, factory.build(args.handshakes))))
    finally:
        stop(running)
    return results


def audit_part(url: str, pki: Pki, workdir: Path, args: argparse.Namespace, factory: MessageFactory,
               query: RawQuery, expected: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for round_number in range(args.rounds):
        print(f"  round {round_number + 1}", flush=True)
        for audit in ((True, False) if round_number % 2 == 0 else (False, True)):
            label = "audit" if audit else "no audit"
            running = start(url, pki, workdir, audit=audit)
            try:
                asyncio.run(association_per_find(running.dicom, query, 5, 1.0, expected))
                hl7_series(running.hl7, None, factory.build(50))
                modalities = partial(association_per_find, running.dicom, query, 50, args.seconds, expected)
                results.append(measure(f"{label} C-FIND x50 association each", running, _sync(modalities)))
                finds = partial(persistent_finds, running.dicom, query, None, 10, args.seconds, expected)
                results.append(measure(f"{label} C-FIND persistent x10", running, _sync(finds)))
                results.append(measure(f"{label} HL7 one connection", running,
                                       partial(hl7_series, running.hl7, None, factory.build(args.hl7_messages))))
            finally:
                stop(running)
    return results


def summarize(results: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Median over rounds of each series, and the ratio of each pair (second / first)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_name.setdefault(result["series"], []).append(result)

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in by_name.get(name, []) if r.get(key) is not None]
        return statistics.median(values) if values else None

    rows = []
    for base, other in pairs:
        for key in ("rate_per_s", "p50_ms", "broker_cpu_ms_per_op"):
            a, b = median(base, key), median(other, key)
            rows.append({"base": base, "other": other, "measure": key, "base_median": a, "other_median": b,
                         "ratio": round(b / a, 3) if a and b else None})
    print("\n  medians over rounds (ratio = second / first)")
    for row in rows:
        print(f"    {row['base']:<34} vs {row['other']:<34} {row['measure']:<22} "
              f"{row['base_median']} -> {row['other_median']}  ratio {row['ratio']}")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--parts", default="tls,audit", help="tls, audit or both (default)")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each C-FIND series")
    parser.add_argument("--clients", type=int, default=10, help="clients of the persistent TLS series")
    parser.add_argument("--hl7-messages", type=int, default=1000, help="messages per HL7 series")
    parser.add_argument("--handshakes", type=int, default=200, help="connections per handshake series")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="secbench-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",")}
    report: dict[str, Any] = {"machine": machine_facts(), "args": {k: str(v) for k, v in vars(args).items()},
                              "started": datetime.now(UTC).isoformat()}
    spread = Spread(args.items, date.today())
    spec = queries(spread.today)[0]  # the typical query: a station's own items of today
    expected = expected_counts(spread, [spec])[spec.name]
    query = RawQuery(spec.identifier(), spec.calling_ae, "BROKER")
    factory = MessageFactory(SAMPLE.read_bytes(), seed=7)
    with workspace() as workdir, fresh_database(args.backend, args.pg_url, workdir) as url:
        pki = make_pki(workdir / "pki")
        migrate(url)
        load = load_database(url, spread)
        print(f"{args.backend}: {load['items']} items loaded; typical query matches {expected}", flush=True)
        if "tls" in parts:
            print("\n== TLS against plain (one broker, both ports) ==", flush=True)
            results = tls_part(url, pki, workdir, args, factory, query, expected)
            report["tls"] = {"series": results, "summary": summarize(results, [
                ("plain C-FIND persistent x1", "tls C-FIND persistent x1"),
                (f"plain C-FIND persistent x{args.clients}", f"tls C-FIND persistent x{args.clients}"),
                ("plain HL7 one connection", "tls HL7 one connection"),
                ("plain DICOM association only", "tls DICOM association only"),
                ("plain HL7 connection per message", "tls HL7 connection per message")])}
        if "audit" in parts:
            print("\n== audit trail on against off (the broker restarted for each) ==", flush=True)
            results = audit_part(url, pki, workdir, args, factory, query, expected)
            report["audit"] = {"series": results, "summary": summarize(results, [
                ("no audit C-FIND x50 association each", "audit C-FIND x50 association each"),
                ("no audit C-FIND persistent x10", "audit C-FIND persistent x10"),
                ("no audit HL7 one connection", "audit HL7 one connection")])}
    path = args.json or ROOT / "bench" / "results" / f"security-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
