"""The tables of the broker.

One stored thing is at the centre: the scheduled procedure step (SPS), inside its requested procedure,
order and patient. The worklist item is kept whole as DICOM JSON (PS3.18 F.2) in ``item``, so that the
worklist, UPS and the REST API return exactly what was mapped; the matching keys of PS3.4 K.6 are copied
into indexed columns beside it so that a C-FIND becomes one SQL query.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeEngine


def matching_text(length: int) -> TypeEngine[str]:
    """A text column a worklist query matches on: byte-wise ("C") collation on PostgreSQL.

    DICOM matching is exact and case-sensitive, and a B-tree index serves ``LIKE 'DOE%'`` only under
    the C collation; a database created with a language collation (en_US.UTF-8, ...) would otherwise
    scan for every wildcard query. SQLite compares bytes already.
    """
    return String(length).with_variant(String(length, collation="C"), "postgresql")


class Base(DeclarativeBase):
    """Declarative base; the metadata is what Alembic migrates."""


class Patient(Base):
    """A patient as the RIS/HIS identifies it: Patient ID within its Issuer (PID-3.1 / PID-3.4)."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_identity"),
                      # the purge deletes patients: each delete checks the patients merged into it
                      Index("ix_patients_merged_into", "merged_into_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    # Patient-level DICOM JSON attributes (name, birth date, other IDs, ...) as last received.
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Set when an ADT^A40/A47 merged this patient into another; orders for it are redirected there.
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Order(Base):
    """An imaging order (ORC): placer and filler order numbers as the RIS sent them."""

    __tablename__ = "orders"
    __table_args__ = (
        Index("ix_orders_placer", "placer_order_number", "placer_issuer"),
        Index("ix_orders_filler", "filler_order_number", "filler_issuer"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    sender: Mapped[str] = mapped_column(String(200), default="")
    placer_order_number: Mapped[str] = mapped_column(String(64), default="")
    placer_issuer: Mapped[str] = mapped_column(String(64), default="")
    filler_order_number: Mapped[str] = mapped_column(String(64), default="")
    filler_issuer: Mapped[str] = mapped_column(String(64), default="")
    # Last ORC-1 / ORC-5 received, for the operator.
    order_control: Mapped[str] = mapped_column(String(2), default="")
    order_status: Mapped[str] = mapped_column(String(2), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    procedures: Mapped[list[RequestedProcedure]] = relationship(back_populates="order")


class RequestedProcedure(Base):
    """A requested procedure: one Study Instance UID and Accession Number, one or more steps."""

    __tablename__ = "requested_procedures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_fk: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    requested_procedure_id: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    description: Mapped[str] = mapped_column(String(64), default="")
    # The procedure state (broker.domain.procedure_states.ProcedureState); every change is in procedure_transitions.
    state: Mapped[str] = mapped_column(String(20), default="SCHEDULED", server_default="SCHEDULED")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    order: Mapped[Order] = relationship(back_populates="procedures")
    steps: Mapped[list[ScheduledStep]] = relationship(back_populates="procedure")


class ScheduledStep(Base):
    """A scheduled procedure step: the worklist item (``item``) and its matching keys as columns.

    PN columns hold the DICOM PN string (``family^given^...``); ``*_norm`` copies are upper-cased for
    the case-insensitive PN matching option. ``scheduled_start`` combines SPS Start Date and Time so
    that a combined date-time range is one range on one index.
    """

    __tablename__ = "scheduled_steps"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "sps_id", name="uq_steps_study_sps"),
        # Unique by construction (derived from the unique Study Instance UID + SPS ID, or checked at UPS
        # N-CREATE), so a plain index: copies of a step's row (tests, tools) need not invent new UIDs.
        Index("ix_steps_ups_instance_uid", "ups_instance_uid"),
        Index("ix_steps_station_start", "scheduled_station_ae_title", "scheduled_start"),
        Index("ix_steps_modality_start", "modality", "scheduled_start"),
        Index("ix_steps_status_start", "sps_status", "scheduled_start"),
        Index("ix_steps_patient", "patient_id", "issuer_of_patient_id"),
        Index("ix_steps_patient_name", "patient_name_norm"),
        Index("ix_steps_start", "scheduled_start", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    procedure_fk: Mapped[int] = mapped_column(ForeignKey("requested_procedures.id"), index=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)

    sps_id: Mapped[str] = mapped_column(matching_text(16))
    sps_status: Mapped[str] = mapped_column(matching_text(16))
    scheduled_station_ae_title: Mapped[str] = mapped_column(matching_text(16), default="")
    scheduled_station_name: Mapped[str] = mapped_column(matching_text(16), default="")
    sps_location: Mapped[str] = mapped_column(matching_text(16), default="")
    sps_start_date: Mapped[str] = mapped_column(String(8), default="")
    sps_start_time: Mapped[str] = mapped_column(String(14), default="")
    scheduled_start: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    modality: Mapped[str] = mapped_column(matching_text(16), default="")
    performing_physician: Mapped[str] = mapped_column(matching_text(324), default="")
    performing_physician_norm: Mapped[str] = mapped_column(matching_text(324), default="", index=True)
    patient_name: Mapped[str] = mapped_column(matching_text(324), default="")
    patient_name_norm: Mapped[str] = mapped_column(matching_text(324), default="")
    patient_id: Mapped[str] = mapped_column(matching_text(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(matching_text(64), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(matching_text(16), default="")
    accession_number: Mapped[str] = mapped_column(matching_text(16), default="", index=True)
    requested_procedure_id: Mapped[str] = mapped_column(matching_text(16), default="", index=True)
    study_instance_uid: Mapped[str] = mapped_column(matching_text(64))
    referring_physician: Mapped[str] = mapped_column(matching_text(324), default="")
    requesting_physician: Mapped[str] = mapped_column(matching_text(324), default="")
    admission_id: Mapped[str] = mapped_column(matching_text(64), default="", index=True)
    placer_order_number: Mapped[str] = mapped_column(matching_text(64), default="")
    filler_order_number: Mapped[str] = mapped_column(matching_text(64), default="")
    specific_character_set: Mapped[str] = mapped_column(String(64), default="")
    # The step's SOP Instance UID as a Unified Procedure Step (PS3.4 CC): set when the step is created
    # (derived from Study Instance UID + SPS ID for HL7 steps, the SCU's for a UPS N-CREATE), never changed.
    ups_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The whole worklist item as DICOM JSON, exactly one item in its SPS Sequence.
    item: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    procedure: Mapped[RequestedProcedure] = relationship(back_populates="steps")


class StepTransition(Base):
    """Every status change of a step, with its time and its cause (the message that made it)."""

    __tablename__ = "step_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_fk: Mapped[int] = mapped_column(ForeignKey("scheduled_steps.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    from_status: Mapped[str] = mapped_column(String(16), default="")
    to_status: Mapped[str] = mapped_column(String(16))
    cause: Mapped[str] = mapped_column(String(200))
    # indexed: purging an HL7 message checks the transitions that name it (a full scan without it)
    inbound_message_fk: Mapped[int | None] = mapped_column(ForeignKey("inbound_messages.id"), nullable=True,
                                                           index=True)


class InboundMessage(Base):
    """The archive of every inbound HL7 message, stored before it is processed, with the ACK sent.

    ``status``: received (stored, not yet processed), accepted (AA), error (AE), rejected (AR),
    duplicate (a repeat of an earlier MSH-10 from the same sender, answered with the original ACK).
    A repeat is recognised by (sender, control ID) among the messages that are not themselves
    duplicates; the partial unique index makes that hold under concurrent connections.
    """

    __tablename__ = "inbound_messages"
    __table_args__ = (
        Index(
            "uq_inbound_original",
            "sender",
            "control_id",
            unique=True,
            sqlite_where=text("duplicate_of_id IS NULL AND control_id != ''"),
            postgresql_where=text("duplicate_of_id IS NULL AND control_id != ''"),
        ),
        Index("ix_inbound_received_at", "received_at"),
        Index("ix_inbound_duplicate_of", "duplicate_of_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    peer: Mapped[str] = mapped_column(String(100), default="")
    sender: Mapped[str] = mapped_column(String(200), default="")
    control_id: Mapped[str] = mapped_column(String(64), default="")
    message_type: Mapped[str] = mapped_column(String(20), default="")
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    charset: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(16), default="received", index=True)
    ack_code: Mapped[str] = mapped_column(String(2), default="")
    # The reply frames sent, joined by 0x1C (a message never contains it).
    ack: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("inbound_messages.id"), nullable=True)


class ProcedureTransition(Base):
    """Every state change of a requested procedure, with its time and the event that caused it.

    ``event_kind`` names where the cause came from (hl7, mpps, ian, stgcmt) and ``event_ref`` which one
    (the HL7 control ID, the MPPS or IAN SOP Instance UID, the commitment Transaction UID), so that a
    department can read a procedure's timeline and find the message behind every line.
    """

    __tablename__ = "procedure_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    procedure_fk: Mapped[int] = mapped_column(ForeignKey("requested_procedures.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    from_state: Mapped[str] = mapped_column(String(20), default="")
    to_state: Mapped[str] = mapped_column(String(20))
    cause: Mapped[str] = mapped_column(String(200))
    event_kind: Mapped[str] = mapped_column(String(16), default="")
    event_ref: Mapped[str] = mapped_column(String(64), default="")
    # indexed: purging an HL7 message checks the transitions that name it (a full scan without it)
    inbound_message_fk: Mapped[int | None] = mapped_column(ForeignKey("inbound_messages.id"), nullable=True,
                                                           index=True)


class MppsInstance(Base):
    """A Modality Performed Procedure Step SOP instance (PS3.4 F.7) as the modality last set it.

    ``dataset`` is the current attribute set as DICOM JSON: N-CREATE's attributes with every N-SET
    applied. ``step_fk`` is the scheduled step it was linked to through the Scheduled Step Attribute
    Sequence; NULL (with ``unscheduled``) when nothing matched, kept for reconciliation.
    """

    __tablename__ = "mpps_instances"
    __table_args__ = (
        CheckConstraint("status IN ('IN PROGRESS', 'COMPLETED', 'DISCONTINUED')", name="ck_mpps_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    step_fk: Mapped[int | None] = mapped_column(ForeignKey("scheduled_steps.id", ondelete="SET NULL"),
                                                nullable=True, index=True)
    procedure_fk: Mapped[int | None] = mapped_column(ForeignKey("requested_procedures.id", ondelete="SET NULL"),
                                                     nullable=True, index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)
    unscheduled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class InstanceAvailability(Base):
    """One referenced SOP instance: what an MPPS reported and an IAN said about its availability.

    ``availability`` is '' until an IAN names it (ONLINE, NEARLINE, OFFLINE, UNAVAILABLE).
    """

    __tablename__ = "instance_availability"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    availability: Mapped[str] = mapped_column(String(16), default="")
    retrieve_ae_title: Mapped[str] = mapped_column(String(64), default="")
    mpps_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    procedure_fk: Mapped[int | None] = mapped_column(ForeignKey("requested_procedures.id", ondelete="SET NULL"),
                                                     nullable=True, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class IanNotification(Base):
    """A received Instance Availability Notification (PS3.4 R), kept whole as DICOM JSON."""

    __tablename__ = "ian_notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    procedure_fk: Mapped[int | None] = mapped_column(ForeignKey("requested_procedures.id", ondelete="SET NULL"),
                                                     nullable=True, index=True)
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime)


class CommitmentRequest(Base):
    """A Storage Commitment Push request (PS3.4 J) toward the archive, and how it was answered.

    ``status``: PENDING (asked, no answer yet), COMMITTED (every instance), FAILED (some instance
    failed, or no answer within ``stgcmt_timeout``: ``reason`` says which).
    """

    __tablename__ = "commitment_requests"
    __table_args__ = (
        CheckConstraint("status IN ('PENDING', 'COMMITTED', 'FAILED')", name="ck_commitment_status"),
        Index("ix_commitment_status_requested", "status", "requested_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), unique=True)
    procedure_fk: Mapped[int] = mapped_column(ForeignKey("requested_procedures.id", ondelete="CASCADE"), index=True)
    archive_ae: Mapped[str] = mapped_column(String(16), default="")
    status: Mapped[str] = mapped_column(String(16), default="PENDING")
    reason: Mapped[str] = mapped_column(String(200), default="")
    requested_at: Mapped[datetime] = mapped_column(DateTime)
    answered_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class CommitmentItem(Base):
    """One SOP instance of a commitment request; ``committed`` NULL until the archive answered for it."""

    __tablename__ = "commitment_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_fk: Mapped[int] = mapped_column(ForeignKey("commitment_requests.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    committed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    failure_reason: Mapped[int | None] = mapped_column(Integer, nullable=True)


class OutboxEvent(Base):
    """A side effect to perform after the commit that decided it (transactional outbox).

    Written in the same transaction as the state change; the relay publishes due rows to the task
    queue and ``run_event`` performs them at least once, idempotently by ``event_id``. Rows with the
    same ``ordering_key`` are performed in ``id`` order (HL7 status messages per order, MPPS forwards per
    target and instance). ``status``: pending, running (claimed until ``lease_until``), done, failed
    (after ``event_max_attempts``; ``broker events retry`` puts it back). A pending row's
    ``lease_until`` is when the relay may publish it again.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'running', 'done', 'failed')", name="ck_outbox_status"),
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_ordering", "ordering_key", "id"),
        # the events not done yet, per key: the relay's search for each key's head (migration 0005)
        Index("ix_outbox_open", "ordering_key", "id", sqlite_where=text("status != 'done'"),
              postgresql_where=text("status != 'done'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    ordering_key: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    done_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class UpsWorkitem(Base):
    """What a step has as a Unified Procedure Step beyond its worklist item (PS3.4 CC), 1:1 with the step.

    Made only when UPS touches the step (N-CREATE, a claim, N-SET): a step HL7 scheduled that no UPS
    SCU changed has none. ``attributes``: the UPS attributes set by N-CREATE / N-SET (DICOM JSON), served
    over the values derived from the worklist item; ``transaction_uid``: the performer's lock while IN
    PROGRESS; ``performer_ae``: who claimed it (event type 2 goes there).
    """

    __tablename__ = "ups_workitems"

    step_fk: Mapped[int] = mapped_column(ForeignKey("scheduled_steps.id", ondelete="CASCADE"), primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), default="")
    performer_ae: Mapped[str] = mapped_column(String(16), default="")
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class UpsSubscription(Base):
    """A UPS subscription (PS3.4 CC.2.3): a subscriber AE to one workitem, or global (``workitem_uid``
    the well-known global instance, optionally filtered by ``matching_keys``, DICOM JSON).

    ``deletion_lock``: the subscriber asked that a final workitem stay until it unsubscribes;
    ``suspended_at``: a global subscription takes no workitems created after it (N-ACTION type 5);
    ``channel``: ``dimse`` or ``websocket`` (a UPS-RS subscription, PS3.18 11.10).
    """

    __tablename__ = "ups_subscriptions"
    __table_args__ = (UniqueConstraint("subscriber_ae", "workitem_uid", name="uq_ups_subscription"),
                      Index("ix_ups_subscriptions_workitem", "workitem_uid"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscriber_ae: Mapped[str] = mapped_column(String(16))
    workitem_uid: Mapped[str] = mapped_column(String(64))
    is_global: Mapped[bool] = mapped_column(Boolean, default=False)
    matching_keys: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    deletion_lock: Mapped[bool] = mapped_column(Boolean, default=False)
    # When a global subscription was suspended: workitems created later are not covered by it.
    suspended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # How the subscriber hears of events: 'dimse' (N-EVENT-REPORT to its AE) or 'websocket' (made over
    # UPS-RS: the reports wait in the outbox for its WebSocket channel). One per AE: the AE's latest
    # subscription decides for all of its rows (broker.domain.ups_notify.use_channel).
    channel: Mapped[str] = mapped_column(String(16), default="dimse", server_default="dimse")


class AuditRecord(Base):
    """An audit event (DICOM audit message, PS3.15 A.5) as recorded: the audit trail and its outbox at once.

    Written in the transaction of the change it records (or batched by the audit writer for reads and
    alerts); the shipper sends undelivered rows, lowest ``id`` first, to the Audit Record Repository and
    sets ``delivered_at``. ``event``: the whole event (participants, objects) as JSON, from which the XML
    is written; the columns beside it are what ``broker audit`` and ``GET /api/audit`` search.
    ``event_id`` / ``event_type``: the code values of EventID and the first EventTypeCode; ``user_id`` /
    ``host``: the requestor's UserID and NetworkAccessPointID. Rows older than ``audit_retention_days``
    are deleted, delivered or not.
    """

    __tablename__ = "audit_records"
    __table_args__ = (
        Index("ix_audit_recorded_at", "recorded_at"),
        Index("ix_audit_user", "user_id", "recorded_at"),
        Index("ix_audit_event", "event_id", "recorded_at"),
        # the shipper's queue: only the rows not delivered yet
        Index("ix_audit_undelivered", "id", sqlite_where=text("delivered_at IS NULL"),
              postgresql_where=text("delivered_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime)
    event_id: Mapped[str] = mapped_column(String(16))
    event_type: Mapped[str] = mapped_column(String(16), default="")
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[int] = mapped_column(Integer, default=0)
    user_id: Mapped[str] = mapped_column(String(200), default="")
    host: Mapped[str] = mapped_column(String(200), default="")
    event: Mapped[dict[str, Any]] = mapped_column(JSON)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class AuditRecordPatient(Base):
    """The patients an audit record names (Patient ID, ``id^^^issuer`` when the issuer is known).

    A table of its own so that searching the trail by patient is an index lookup for any patient an
    event names (a query's answer may name several), not a scan of the JSON.
    """

    __tablename__ = "audit_record_patients"

    patient_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("audit_records.id", ondelete="CASCADE"), primary_key=True,
                                           index=True)


class ClusterLease(Base):
    """A named lease: what one holder (a node, or one process's association pool) may do alone for a while.

    ``expires_at``: the holder renews before it; past it anyone may take the lease over (a dead holder).
    Times are UTC without time zone, from PostgreSQL's clock on PostgreSQL (one clock for every node),
    from the process's clock on SQLite (one host). ``wanted_by``: another holder waits for the lease
    and asks this one to let go (a subscriber's association, see :mod:`broker.cluster.handoff`).
    """

    __tablename__ = "cluster_leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    wanted_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class ClusterNode(Base):
    """A ``broker run`` process of the cluster: registered at start, its heartbeat renewed every
    ``cluster_heartbeat_interval``, ``stopped_at`` set when it stops cleanly. A node is live while it
    has not stopped and its heartbeat is recent (UTC, as :class:`ClusterLease`)."""

    __tablename__ = "cluster_nodes"

    node_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    ae_title: Mapped[str] = mapped_column(String(16), default="")
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class WorklistFile(Base):
    """A ``.wl`` file of a watched worklist folder as the broker last read it (``broker.worklist_files``).

    One row per file (folder + path relative to it): its size and modification time (a scan that finds
    both unchanged does not open the file again, so a restart re-imports nothing), the SHA-256 of the
    bytes last applied (a rewrite with the same bytes changes nothing), the identity of its step
    (``uid:<Study Instance UID>|<SPS ID>`` or ``file:<path>``) and what became of it. ``message_id`` is
    the archive row (``inbound_messages``) of the last reading; no foreign key, so the retention of the
    HL7 archive may purge that row. ``present`` is false once the file was deleted.
    """

    __tablename__ = "worklist_files"
    __table_args__ = (UniqueConstraint("folder", "path", name="uq_worklist_files_path"),
                      Index("ix_worklist_files_identity", "identity"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    folder: Mapped[str] = mapped_column(String(500))
    path: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    identity: Mapped[str] = mapped_column(String(200), default="")
    # created, updated, unchanged, refused, cancelled, removed (deleted, step left as it was)
    outcome: Mapped[str] = mapped_column(String(16), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    message_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    present: Mapped[bool] = mapped_column(Boolean, default=True)
    read_at: Mapped[datetime] = mapped_column(DateTime)


def table_of(model: type[Base]) -> Table:
    """The Core table of a model: the hot paths use Core statements on the same tables."""
    return cast(Table, model.__table__)


# The Core tables the hot paths and reports write their statements on, named once here for every module
# that uses them (each module declaring its own gave the same table several names: a procedure
# transition was TRANSITIONS in one module and PROCEDURE_TRANSITIONS in the next).
PATIENTS = table_of(Patient)
ORDERS = table_of(Order)
PROCEDURES = table_of(RequestedProcedure)
STEPS = table_of(ScheduledStep)
STEP_TRANSITIONS = table_of(StepTransition)
PROCEDURE_TRANSITIONS = table_of(ProcedureTransition)
MPPS = table_of(MppsInstance)
IAN_NOTIFICATIONS = table_of(IanNotification)
INSTANCE_AVAILABILITY = table_of(InstanceAvailability)
COMMITMENT_REQUESTS = table_of(CommitmentRequest)
COMMITMENT_ITEMS = table_of(CommitmentItem)
UPS_WORKITEMS = table_of(UpsWorkitem)
UPS_SUBSCRIPTIONS = table_of(UpsSubscription)
