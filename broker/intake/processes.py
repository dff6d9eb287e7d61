"""HL7 intake processes (``hl7_processes`` = N > 0): each serves whole MLLP connections, so the intake
uses every core.

Python runs one thread at a time; an order costs ~2 ms of CPU (decode, map, a dozen statements), so one
process is bound by the GIL long before the database is. Handing every *message* to a process pool
(pickling, pipes and several thread hops per message) gained ~15 % with four senders and cost latency
with one. So what crosses the process boundary is the *connection*: the listening process accepts it and
passes the socket's file descriptor (``SCM_RIGHTS`` over a Unix socketpair, one per process) to the
intake process with the fewest open connections (ties: round robin). That process serves it entirely,
reading, running the intake and replying, with the listener's own thread-per-connection code
(:meth:`broker.hl7.mllp.MLLPServer.adopt`); order per connection holds as before.

A connection from the TLS port (``hl7_tls_port``) is passed as the raw TCP socket, flagged as such
(its own command byte); the intake process wraps it with its own server context and does the handshake
in the connection's thread, as the listener would. No TLS state ever crosses the process boundary.

What still goes back, one short line each over the socketpair: a closed connection (the listener keeps
``max_connections`` for the whole broker and :attr:`MLLPServer.connection_count` meaningful), and each
message's (type, outcome), counted by the listener process whose ``/metrics`` serves the counter.

An intake process that dies (killed, out of memory) takes its connections with it: the kernel closes
them, the senders reconnect and resend, and the intake answers a resent MSH-10 with the stored ACK. The
listener sees EOF on the socketpair, forgets those connections, logs ``hl7.worker_process_died`` and
starts a replacement; new connections only go to processes that are running.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

from broker import logs
from broker.audit.trail import AuditWriter
from broker.config import Settings
from broker.hl7.mllp import MLLPServer, Peer, Release
from broker.intake.build import build_intake
from broker.metrics import count_hl7_labels, hl7_message_labels
from broker.store.session import make_engine
from broker.tls import server_context

log = structlog.get_logger(__name__)

# spawn, not fork: the listening process has threads (and their locks) that a fork would copy.
_CONTEXT = multiprocessing.get_context("spawn")

START_TIMEOUT = 120.0
"""Seconds :meth:`IntakeProcesses.start` waits for every process to have built its intake."""

STOP_TIMEOUT = 20.0
"""Seconds :meth:`IntakeProcesses.stop` gives the processes to finish their messages before SIGKILL."""

RESTART_DELAY = 1.0
"""Seconds before replacing a process that died before it was ready (a restart loop would spin)."""

# Listener -> intake process: one byte each.
_CONNECTION = ord("C")  # carries one socket's descriptor
_TLS_CONNECTION = ord("T")  # carries one socket's descriptor, from the TLS port: to be wrapped
_STOP = ord("S")
# Intake process -> listener: one line each.
_READY = b"R"
_CLOSED = b"X"
_MESSAGE = b"M"  # followed by the JSON list [message type, outcome]


@dataclass(eq=False)
class _Worker:
    """The listener's side of one intake process."""

    number: int  # 1..N, for the logs; a replacement keeps the number of the process it replaces
    process: BaseProcess
    channel: socket.socket
    started: float
    ready: threading.Event = field(default_factory=threading.Event)
    releases: deque[Release] = field(default_factory=deque)  # one per open connection
    alive: bool = True


class IntakeProcesses:
    """Starts N intake processes and gives each accepted connection to one of them.

    :meth:`hand_off` is the :data:`~broker.hl7.mllp.HandOff` of the listening
    :class:`~broker.hl7.mllp.MLLPServer`. One watcher thread per process reads its reports and replaces
    it when it dies.
    """

    def __init__(self, settings: Settings, processes: int) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self._settings_json = settings.model_dump_json()
        self._processes = processes
        self._lock = threading.Lock()  # guards the workers, their releases and the sends to them
        self._workers: list[_Worker] = []
        self._watchers: list[threading.Thread] = []
        self._next = 0  # round robin among processes with equally few connections
        self._started = False
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start the processes; return once each has built its intake, raise if one could not."""
        with self._lock:
            self._workers = [self._spawn(number) for number in range(1, self._processes + 1)]
        self._watchers = [threading.Thread(target=self._watch, args=(index,), name=f"hl7-intake-watch-{index + 1}",
                                           daemon=True) for index in range(self._processes)]
        for thread in self._watchers:
            thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        for worker in self._workers:
            while not worker.ready.wait(0.1):
                if not worker.alive or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"HL7 intake process {worker.number} did not start (see its log lines)")
        self._started = True

    def hand_off(self, sock: socket.socket, peer: Peer, release: Release, *, tls: bool = False) -> None:
        """Pass ``sock`` to the running process with the fewest connections; raise if none takes it.

        ``tls``: it came from the TLS port; the process does the handshake.
        """
        command = bytes([_TLS_CONNECTION if tls else _CONNECTION])
        with self._lock:
            for worker in self._candidates():
                try:
                    # MSG_DONTWAIT: a process that stopped reading its commands must not block accepting.
                    socket.send_fds(worker.channel, [command], [sock.fileno()], socket.MSG_DONTWAIT)
                except OSError as exc:  # died a moment ago (its watcher is about to tell), or stuck
                    log.warning("hl7.hand_off_failed", worker=worker.number, pid=worker.process.pid,
                                error=type(exc).__name__)
                    continue
                worker.releases.append(release)
                self._next = (self._workers.index(worker) + 1) % len(self._workers)
                log.info("hl7.connection_handed_off", peer=f"{peer[0]}:{peer[1]}", worker=worker.number,
                         pid=worker.process.pid, worker_connections=len(worker.releases), tls=tls)
                return
        raise RuntimeError("no HL7 intake process is running")

    def stop(self) -> None:
        """Tell every process to stop (running messages are answered), wait, then kill what is left."""
        with self._lock:
            self._stopping.set()
            workers = list(self._workers)
            for worker in workers:
                with contextlib.suppress(OSError):
                    worker.channel.send(bytes([_STOP]), socket.MSG_DONTWAIT)
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in self._watchers:  # a watcher ends once its process has exited and been reaped
            thread.join(max(0.0, deadline - time.monotonic()))
        for worker, thread in zip(workers, self._watchers, strict=False):
            if thread.is_alive():
                log.warning("hl7.worker_process_killed", worker=worker.number, pid=worker.process.pid,
                            after_seconds=STOP_TIMEOUT)
                with contextlib.suppress(OSError):
                    worker.process.kill()
                thread.join(5)
        if not self._watchers:  # start() never got that far
            for worker in workers:
                self._bury(worker)

    @property
    def connection_counts(self) -> list[int]:
        """Open connections per process (for tests and logs)."""
        with self._lock:
            return [len(worker.releases) for worker in self._workers]

    def _candidates(self) -> list[_Worker]:
        """Running processes, fewest connections first; ties in round-robin order from ``_next``."""
        count = len(self._workers)
        ordered = [self._workers[(self._next + i) % count] for i in range(count)]
        return sorted((worker for worker in ordered if worker.alive), key=lambda worker: len(worker.releases))

    def _spawn(self, number: int) -> _Worker:
        """Start one intake process with its end of a new socketpair; the caller holds the lock."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = _CONTEXT.Process(target=_worker_main, args=(self._settings_json, theirs, number),
                                   name=f"hl7-intake-{number}", daemon=True)
        try:
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # only the process holds it now: its exit is our EOF
        log.info("hl7.worker_process_started", worker=number, pid=process.pid)
        return _Worker(number=number, process=process, channel=ours, started=time.monotonic())

    def _watch(self, index: int) -> None:
        """Watcher thread of one slot: read reports until EOF, then bury the process and replace it."""
        while True:
            worker = self._workers[index]
            self._read_reports(worker)
            self._bury(worker)
            if self._stopping.is_set() or not (self._started or worker.ready.is_set()):
                return  # stopping, or start() fails: it cannot even start
            if not worker.ready.is_set() and self._stopping.wait(RESTART_DELAY):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._workers[index] = self._spawn(worker.number)

    def _read_reports(self, worker: _Worker) -> None:
        """Apply the process's report lines until its end of the socketpair closes (it exited)."""
        pending = b""
        while True:
            try:
                data = worker.channel.recv(65536)
            except OSError:
                data = b""
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                self._report(worker, line)

    def _report(self, worker: _Worker, line: bytes) -> None:
        """One report: a message to count, a connection that ended, or ready."""
        kind = line[:1]
        if kind == _MESSAGE:
            try:
                message_type, outcome = json.loads(line[1:])
            except ValueError:
                log.warning("hl7.worker_report_unreadable", worker=worker.number, bytes=len(line))
                return
            count_hl7_labels(str(message_type), str(outcome))
        elif kind == _CLOSED:
            with self._lock:
                release = worker.releases.popleft() if worker.releases else None
            if release is not None:
                release()
        elif kind == _READY:
            worker.ready.set()

    def _bury(self, worker: _Worker) -> None:
        """The process has exited (or is about to): reap it and forget its connections (the kernel closed them)."""
        with self._lock:
            worker.alive = False
            releases = list(worker.releases)
            worker.releases.clear()
        for release in releases:
            release()
        worker.process.join(5)
        if worker.process.is_alive():  # closed its socketpair but lingers
            worker.process.kill()
            worker.process.join(5)
        worker.channel.close()
        fields: dict[str, Any] = {"worker": worker.number, "pid": worker.process.pid,
                                  "exitcode": worker.process.exitcode, "connections": len(releases)}
        if self._stopping.is_set():
            log.info("hl7.worker_process_stopped", **fields)
        else:
            log.error("hl7.worker_process_died", **fields)


# --- in the intake process --------------------------------------------------------------------------


class _Reports:
    """The intake process's side of the socketpair: report lines, written whole by any thread."""

    def __init__(self, channel: socket.socket) -> None:
        self._channel = channel
        self._lock = threading.Lock()

    def send(self, line: bytes) -> None:
        # The listener is gone if this fails: its EOF on our commands ends this process anyway.
        with self._lock, contextlib.suppress(OSError):
            self._channel.sendall(line + b"\n")

    def message(self, raw: bytes, replies: list[bytes] | None) -> None:
        """A :data:`~broker.hl7.mllp.MessageCounter`: the labels go to the listener's counter."""
        try:
            labels = hl7_message_labels(raw, replies)
        except Exception:  # a metric must never break the answer (as count_hl7_message)
            log.debug("metrics.hl7_count_failed", exc_info=True)
            return
        self.send(_MESSAGE + json.dumps(labels).encode())

    def closed(self) -> None:
        self.send(_CLOSED)


def _worker_main(settings_json: str, channel: socket.socket, number: int) -> None:
    """An intake process: serve the connections the listener passes until told to stop."""
    # Ctrl-C reaches the whole process group; the listener decides when we stop, after the messages
    # in flight are answered. SIGTERM (an init system signals the whole group) stops us gracefully.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: _stop_reading(channel))
    settings = Settings.model_validate_json(settings_json)
    logs.configure(settings.log_format, settings.log_level, settings.log_patient_data)
    reports = _Reports(channel)
    intake = build_intake(settings, pool_size=settings.hl7_workers)
    tls_context = (server_context(settings, require_client_cert=settings.hl7_tls_require_client_cert)
                   if settings.hl7_tls_port else None)
    # The handshakes happen here, so the Security Alerts of refused TLS clients are recorded here.
    audit_engine = make_engine(settings.database_url, pool_size=1) if tls_context and settings.audit_enabled else None
    audit = AuditWriter(audit_engine, settings.audit_flush_interval) if audit_engine is not None else None
    server = MLLPServer(intake, port=None, max_message_bytes=settings.hl7_max_message_bytes,
                        idle_timeout=settings.hl7_idle_timeout, max_connections=settings.hl7_max_connections,
                        workers=settings.hl7_workers, count_message=reports.message, tls_context=tls_context,
                        handshake_timeout=settings.tls_handshake_timeout, ae_title=settings.ae_title, audit=audit)
    reports.send(_READY)
    try:
        for sock, tls in _received_sockets(channel):
            try:
                server.adopt(sock, on_close=reports.closed, tls=tls)
            except Exception:  # adopt reported it closed; the next connection may fare better
                log.exception("hl7.adopt_failed", worker=number)
    finally:
        server.shutdown()
        intake.close()
        if audit is not None and audit_engine is not None:
            audit.close()  # flushes what is still queued
            audit_engine.dispose()
    log.info("hl7.worker_process_exiting", worker=number, pid=os.getpid())


def _stop_reading(channel: socket.socket) -> None:
    """SIGTERM: end the command loop as if the listener had closed (replies can still be reported)."""
    with contextlib.suppress(OSError):
        channel.shutdown(socket.SHUT_RD)


def _received_sockets(channel: socket.socket) -> Iterator[tuple[socket.socket, bool]]:
    """The sockets the listener passes, in order, each with whether it came from the TLS port, until
    it says stop or closes."""
    descriptors: deque[int] = deque()
    try:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(channel, 4096, 16)
            except OSError:
                return
            descriptors.extend(fds)
            if not data:
                return
            for command in data:
                if command == _STOP:
                    return
                if command in (_CONNECTION, _TLS_CONNECTION) and descriptors:
                    yield socket.socket(fileno=descriptors.popleft()), command == _TLS_CONNECTION
    finally:
        for fd in descriptors:  # passed, but never served: the sender sees a close and resends
            with contextlib.suppress(OSError):
                os.close(fd)
