"""The DICOM AE on its ports: the plain port (``dicom_port``) and the TLS port (``dicom_tls_port``).

Either may be 0 (production: TLS only). Both serve the same services from the same engines, admit by
the same policy and count against one association limit: a modality that moves to the TLS port does
not get a second allowance. ``broker run`` and each extra acceptor process (``dicom_processes``) build
one :class:`DicomListeners`; with several processes every one binds both ports with SO_REUSEPORT.
"""

from __future__ import annotations

from sqlalchemy import Engine

from broker.audit.trail import AuditWriter
from broker.config import Settings
from broker.dicom.server import AssociationCount, DicomServer
from broker.dicom.workflow import Workflow
from broker.tls import server_context


class DicomPortUnavailable(OSError):
    """A DICOM port could not be bound (``port`` says which)."""

    def __init__(self, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.port = port


class DicomListeners:
    """The plain and the TLS DICOM server of one process (those the settings ask for).

    The TLS context is built here, so a certificate or key that cannot be loaded fails at once
    (:class:`ssl.SSLError`), before anything listens.
    """

    def __init__(self, settings: Settings, engine: Engine, workflow: Workflow | None = None, *,
                 count: AssociationCount | None = None, reuse_port: bool = False,
                 audit: AuditWriter | None = None) -> None:
        count = count or AssociationCount()
        self.servers: list[DicomServer] = []
        if settings.dicom_port:
            self.servers.append(DicomServer(settings, engine, workflow, count=count, reuse_port=reuse_port,
                                            port=settings.dicom_port, audit=audit))
        if settings.dicom_tls_port:
            context = server_context(settings, require_client_cert=settings.dicom_tls_require_client_cert)
            self.servers.append(DicomServer(settings, engine, workflow, count=count, reuse_port=reuse_port,
                                            port=settings.dicom_tls_port, tls=context, audit=audit))

    @property
    def plain_port(self) -> int | None:
        """The bound plain port, None without one."""
        return next((server.port for server in self.servers if server.tls is None), None)

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port, None without one."""
        return next((server.port for server in self.servers if server.tls is not None), None)

    def start(self) -> None:
        """Bind and accept on every port; raises :class:`DicomPortUnavailable` (nothing left listening)."""
        started: list[DicomServer] = []
        for server in self.servers:
            try:
                server.start()
            except OSError as exc:
                for running in started:
                    running.stop()
                raise DicomPortUnavailable(server.configured_port, exc) from exc
            started.append(server)

    def stop(self) -> None:
        """Stop every port and close the associations still open."""
        for server in self.servers:
            server.stop()
