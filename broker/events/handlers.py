"""The handler of each event kind: read the payload (and the database where needed), act outward.

A handler raises to ask for a retry; it returns normally when the side effect is done.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, select

from broker.config import Settings
from broker.outbound import dicom_peers
from broker.outbound.ris_hl7 import RisStatusSender
from broker.outbound.ups_events import build_ups_event_handler
from broker.outbox import outbox
from broker.outbox.runner import BatchHandler, Event, Handler
from broker.stgcmt.service import CommitmentService
from broker.store.tables import CommitmentItem, CommitmentRequest, table_of
from broker.tls import client_context
from broker.workflow.context import WorkflowConfig

REQUESTS = table_of(CommitmentRequest)
ITEMS = table_of(CommitmentItem)


class ConfigurationMissing(Exception):
    """An event needs a destination the settings do not (or no longer) name."""


def build_handlers(settings: Settings, engine: Engine,
                   send_commitment: Callable[[dicom_peers.CommitmentRequestMessage], None] | None = None,
                   commitment: CommitmentService | None = None) -> dict[str, Handler]:
    """The handlers for ``settings``: one RIS connection per process, peers by AE title.

    A commitment report the archive sends on the request's own association is recorded through
    ``commitment`` (by default a :class:`CommitmentService` on ``engine``), as the DICOM server
    records one that comes on an association the archive opens.
    """
    address = settings.ris_address
    sender = (RisStatusSender(address[0], address[1], settings.ris_status_message_type,
                              settings.ris_hl7_ack_timeout,
                              ssl_context=client_context(settings) if settings.ris_hl7_tls else None)
              if address else None)
    peers = settings.peers
    peer_tls = dicom_peers.PeerTls(settings)  # the peers of dicom_tls_peers are reached over TLS
    results = commitment or CommitmentService(engine, WorkflowConfig.from_settings(settings))

    def send_and_wait(message: dicom_peers.CommitmentRequestMessage) -> None:
        dicom_peers.send_commitment_request(message, commitment=results, report_wait=settings.stgcmt_report_wait,
                                            timeout=settings.dicom_dimse_timeout, tls=peer_tls)

    commit = send_commitment or send_and_wait

    def ris_status(event: Event) -> None:
        if sender is None:
            raise ConfigurationMissing("BROKER_RIS_HL7_ADDRESS is empty")
        sender.send(event.payload, event.event_id)

    def mpps_forward(event: Event) -> None:
        target = event.payload["target"]
        if target not in peers:
            raise ConfigurationMissing(f"{target} is not in BROKER_DICOM_PEERS")
        dicom_peers.forward_mpps(settings.ae_title, peers[target], event.payload["operation"],
                                 event.payload["sop_instance_uid"], event.payload["dataset"],
                                 settings.dicom_dimse_timeout, peer_tls)

    def stgcmt_request(event: Event) -> None:
        transaction_uid = event.payload["transaction_uid"]
        archive_ae = event.payload["archive_ae"]
        if archive_ae not in peers:
            raise ConfigurationMissing(f"{archive_ae} is not in BROKER_DICOM_PEERS")
        with engine.connect() as db:
            request = db.execute(select(REQUESTS).where(REQUESTS.c.transaction_uid == transaction_uid)).one()
            if request.status != "PENDING":
                return  # answered (or timed out) meanwhile: nothing to ask any more
            referenced = tuple((r.sop_class_uid, r.sop_instance_uid) for r in db.execute(
                select(ITEMS.c.sop_class_uid, ITEMS.c.sop_instance_uid).where(ITEMS.c.request_fk == request.id)
                .order_by(ITEMS.c.id)))
        commit(dicom_peers.CommitmentRequestMessage(transaction_uid, peers[archive_ae], settings.ae_title,
                                                    referenced))

    return {outbox.RIS_STATUS: ris_status, outbox.MPPS_FORWARD: mpps_forward, outbox.STGCMT_REQUEST: stgcmt_request}


def build_batch_handlers(settings: Settings, engine: Engine) -> dict[str, BatchHandler]:
    """The kinds whose events of a task are handled together: UPS event reports go out side by side."""
    return {outbox.UPS_EVENT: build_ups_event_handler(settings, engine)}
