"""Starts and stops the broker's listeners together: the HL7 MLLP listener, the DICOM AE and the
event path (outbox relay, and with no Redis the in-process worker).

The runtime refuses to start on a database that is not at the newest migration: running new code
on an old schema could store items that a later migration cannot read.

Several ``broker run`` processes may share one database as a cluster (``broker.cluster``): each is a
node of the registry, the periodic jobs (Storage Commitment timeouts, outbox VACUUM, audit retention,
data retention) run on one node at a time, one node's audit shipper sends, and the UPS subscribers
hear RESTARTED only when the first node of a stopped cluster starts and GOING DOWN only when the last
live node stops.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime

import structlog
from sqlalchemy import Engine

from broker.audit.events import application_activity
from broker.audit.shipper import RETENTION_EVERY, AuditShipper
from broker.audit.shipper import apply_retention as apply_audit_retention
from broker.audit.trail import AuditWriter, broker_participant, record
from broker.cluster.nodes import Node
from broker.cluster.periodic import PeriodicJobs
from broker.config import Settings, StartupError
from broker.dicom import processes
from broker.dicom.listeners import DicomListeners, DicomPortUnavailable
from broker.dicom.server import AssociationCount
from broker.events.wiring import EventPath
from broker.hl7.mllp import MLLPServer
from broker.intake.build import build_intake
from broker.intake.processes import IntakeProcesses
from broker.intake.service import Intake
from broker.retention import apply_retention
from broker.store.session import make_engine
from broker.tls import server_context
from broker.web import server as web_server
from broker.web.server import start_with_broker
from broker.worklist_files.watcher import FolderWatcher, watcher_from_settings

log = structlog.get_logger(__name__)

STOP_DRAIN_SECONDS = 3.0
"""At stop, how long the shipper may keep sending the last records (the Application Stop among them)."""


async def serve(settings: Settings) -> None:
    """Run the listeners until SIGINT or SIGTERM."""
    # First of all: the HL7 listener answers as soon as it is bound, while the rest is still starting,
    # and a SIGTERM in that time must stop the broker cleanly (after start-up), not kill it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    web_server.check(settings)  # a bad tokens file or HTTPS certificate stops the start before any listener
    # Before the intake processes: a certificate or key that cannot be read stops the start right here.
    hl7_tls = (server_context(settings, require_client_cert=settings.hl7_tls_require_client_cert)
               if settings.hl7_tls_port else None)
    intake: Intake | None = None
    intake_processes: IntakeProcesses | None = None
    if settings.hl7_processes:
        # Check schema and mappings here, with one clear line if wrong; the processes build their own.
        build_intake(settings, pool_size=1).close()
        intake_processes = IntakeProcesses(settings, settings.hl7_processes)
        await asyncio.to_thread(intake_processes.start)
    else:
        intake = build_intake(settings)
    # The audit trail: one writer per process for events outside a transaction (queries, alerts), and
    # the shipper that delivers the records to the Audit Record Repository and applies the retention.
    audit_engine = make_engine(settings.database_url, pool_size=2)
    audit = AuditWriter(audit_engine, settings.audit_flush_interval) if settings.audit_enabled else None
    shipper = AuditShipper(settings, audit_engine) if settings.audit_enabled else None
    # With intake processes this process only accepts, and passes each connection to one of them.
    # The plain and the TLS port (each 0 = none) share one server and its connection limit.
    server = MLLPServer(intake, host=settings.hl7_host, port=settings.hl7_port or None,
                        tls_port=settings.hl7_tls_port or None, tls_context=hl7_tls,
                        handshake_timeout=settings.tls_handshake_timeout, ae_title=settings.ae_title,
                        audit=audit,
                        max_message_bytes=settings.hl7_max_message_bytes,
                        idle_timeout=settings.hl7_idle_timeout,
                        max_connections=settings.hl7_max_connections, workers=settings.hl7_workers,
                        hand_off=intake_processes.hand_off if intake_processes is not None else None)
    try:
        await server.start()
    except BaseException:
        if intake_processes is not None:
            await asyncio.to_thread(intake_processes.stop)
        _close_audit(audit, None)
        raise
    # The relay and workers; events.workflow holds the MPPS / IAN / commitment services for the DICOM edge.
    events_engine = make_engine(settings.database_url, pool_size=10)
    events = EventPath.start(settings, events_engine)
    several = settings.dicom_processes > 1
    count = processes.shared_count() if several else None
    # The plain and the TLS DICOM port (each 0 = none) share one association count.
    try:
        dicom = DicomListeners(settings, make_engine(settings.database_url, pool_size=10, for_reading=True),
                               workflow=events.workflow, count=AssociationCount(count), reuse_port=several,
                               audit=audit)
        dicom.start()
    except (OSError, ValueError) as exc:
        await server.stop()
        await asyncio.to_thread(events.stop)
        if intake_processes is not None:
            await asyncio.to_thread(intake_processes.stop)
        _close_audit(audit, None)
        if isinstance(exc, DicomPortUnavailable):
            raise StartupError(f"cannot listen on DICOM port {exc.port}: {exc.strerror}") from exc
        raise StartupError(f"cannot set up TLS for the DICOM port: {exc}") from exc
    acceptors = processes.start_acceptors(settings, count, settings.dicom_processes - 1) if several else []
    add_jobs(events, settings, events_engine, audit_engine)
    web = await start_with_broker(settings, audit)
    # Worklist folders (.wl files) as steps, read by the node holding the lease worklist-folders.
    folders: FolderWatcher | None = None
    if settings.worklist_folder_paths:
        folders_engine = make_engine(settings.database_url, pool_size=2, plan_each_execution=True)
        folders = watcher_from_settings(settings, folders_engine)
        await asyncio.to_thread(folders.start)
    log.info("broker.started", hl7_port=settings.hl7_port and server.port,
             hl7_tls_port=settings.hl7_tls_port and server.tls_port, dicom_port=dicom.plain_port,
             dicom_tls_port=dicom.tls_port,
             hl7_processes=settings.hl7_processes,
             dicom_processes=settings.dicom_processes,
             ae_title=settings.ae_title,
             database=_safe_url(settings.database_url), queue="redis" if settings.redis_url else "embedded")
    if shipper is not None:
        await asyncio.to_thread(_application_activity, audit_engine, settings, True)
        shipper.start()
    # This node joins the cluster's registry; UPS subscribers hear of the start (SCP Status Change,
    # RESTARTED) when no other node was live (the SCP, the whole cluster, was down); nothing is queued
    # without subscribers.
    node_engine = make_engine(settings.database_url, pool_size=1)
    node = Node.from_settings(settings, node_engine)
    await asyncio.to_thread(events.workflow.ups.scp_status_change, "RESTARTED", node.join)
    node.start_heartbeat()
    await stop.wait()
    log.info("broker.stopping")
    # ... and of the shutdown (GOING DOWN) when this is the last live node, delivered while the event
    # path still runs. One node of several stopping leaves the SCP up: the others serve on.
    node.stop_heartbeat()
    await asyncio.to_thread(events.workflow.ups.going_down, settings.ups_shutdown_wait, node.leave)
    node_engine.dispose()
    if web is not None:
        await web.stop()
    if folders is not None:
        await asyncio.to_thread(folders.stop)
        folders.engine.dispose()
    await asyncio.to_thread(processes.stop_acceptors, acceptors)
    await asyncio.to_thread(dicom.stop)
    await server.stop()  # with intake processes: stops accepting; they still serve their connections
    if intake_processes is not None:
        await asyncio.to_thread(intake_processes.stop)
    await asyncio.to_thread(events.stop)
    if intake is not None:
        intake.close()
    await asyncio.to_thread(_close_audit, audit, shipper)
    audit_engine.dispose()
    log.info("broker.stopped")


RETENTION_FIRST_AFTER = 60.0
"""Seconds after start of the first data retention pass (then every ``retention_interval``): a node
restarted more often than the interval would otherwise never run it."""


def add_jobs(events: EventPath, settings: Settings, engine: Engine, audit_engine: Engine) -> None:
    """The periodic jobs ``broker run`` adds to those of the event path (each run by one node of the
    cluster at a time): the audit retention pass (at start, then hourly) and the data retention of
    ``broker.retention`` (every ``retention_interval``; its discontinued steps wake the relay)."""
    jobs: PeriodicJobs = events.jobs
    if settings.audit_enabled:
        jobs.add("audit-retention", RETENTION_EVERY, lambda: apply_audit_retention(settings, audit_engine),
                 first_after=0)
    jobs.add("retention", settings.retention_interval,
             lambda: apply_retention(settings, engine, datetime.now(), wake=events.wake),
             first_after=min(RETENTION_FIRST_AFTER, settings.retention_interval))


def _application_activity(engine: Engine, settings: Settings, started: bool) -> None:
    """Record Application Activity (start or stop) in a transaction of its own."""
    event = application_activity(started, broker_participant(settings.ae_title, role="application"))
    with engine.begin() as db:
        record(db, event, datetime.now())


def _close_audit(audit: AuditWriter | None, shipper: AuditShipper | None) -> None:
    """Commit what the writer holds; with the broker stopping (``shipper`` given) record the Application
    Stop after it, as the last record, and let the shipper send what it can before it stops."""
    if audit is not None:
        audit.close()
    if shipper is not None:
        try:
            _application_activity(shipper.engine, shipper.settings, False)
        except Exception:  # the database is gone: the stop goes unrecorded, the stop goes on
            log.exception("audit.write_failed", event="application_stop")
        shipper.stop(drain_seconds=STOP_DRAIN_SECONDS)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
