"""More acceptor processes on the DICOM port (``dicom_processes``), so the DICOM services use every core.

One Python process runs one thread at a time (the GIL): with 50 modalities querying, the broker's single
acceptor process saturated one core (measured ~86 typical queries/s, 11 ms of CPU each) while the other
core idled. With ``dicom_processes`` = N, ``broker run`` starts N-1 more processes that bind the same port
with SO_REUSEPORT (Linux spreads new connections over them) and serve the same services from the same
database; the association limit is one counter shared by all of them. With a TLS port
(``dicom_tls_port``) each process binds it too and builds its own TLS context (an ``SSLContext`` does
not cross a process boundary), and each records its own audit events with an audit writer of its own.

Events (MPPS, IAN, commitment results) committed by another process are found by the relay of
``broker run`` on its next poll (``event_poll_interval``) rather than at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

from broker.config import Settings

log = structlog.get_logger(__name__)

_CONTEXT = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or connections inherited


def shared_count() -> Any:
    """The association counter the acceptor processes share (a ``multiprocessing.Value('i')``)."""
    return _CONTEXT.Value("i", 0)


def start_acceptors(settings: Settings, count: Any, number: int) -> list[BaseProcess]:
    """Start ``number`` acceptor processes; each binds the DICOM ports (plain, TLS) with SO_REUSEPORT."""
    processes: list[BaseProcess] = []
    for index in range(number):
        process = _CONTEXT.Process(target=_acceptor_main, args=(settings.model_dump(mode="json"), count),
                                   name=f"dicom-acceptor-{index + 2}", daemon=True)
        process.start()
        processes.append(process)
    return processes


def stop_acceptors(processes: list[BaseProcess], timeout: float = 10.0) -> None:
    """SIGTERM each (its associations are aborted), then wait; SIGKILL what does not end."""
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(1)


def _acceptor_main(settings_data: dict[str, Any], count: Any) -> None:
    """An extra acceptor process: the DICOM services only, until SIGTERM."""
    from broker import logs
    from broker.audit.trail import AuditWriter
    from broker.dicom.listeners import DicomListeners
    from broker.dicom.server import AssociationCount
    from broker.dicom.workflow import build_workflow
    from broker.store.session import make_engine

    settings = Settings.model_validate(settings_data)
    logs.configure(settings.log_format, settings.log_level, settings.log_patient_data)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    writer = make_engine(settings.database_url, pool_size=10)
    workflow = build_workflow(settings, writer)
    audit = AuditWriter(writer, settings.audit_flush_interval) if settings.audit_enabled else None
    listeners = DicomListeners(settings, make_engine(settings.database_url, pool_size=10, for_reading=True),
                               workflow=workflow, count=AssociationCount(count), reuse_port=True, audit=audit)
    listeners.start()
    stop.wait()
    listeners.stop()
    if audit is not None:
        audit.close()
