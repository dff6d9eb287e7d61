"""The referenced SOP instances of a procedure: what an MPPS reported, what an IAN made available.

One row per SOP Instance UID (``instance_availability``): an MPPS's Performed Series Sequence and an
IAN's Referenced Series Sequence about the same instance fill in the same row, so a commitment
request can be built from everything known about the procedure, whichever arrived first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, insert, select, update

from broker.store.tables import InstanceAvailability, table_of

INSTANCES = table_of(InstanceAvailability)
_KNOWN = select(INSTANCES.c.sop_instance_uid).where(INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True)))
_INSERT = insert(INSTANCES)


@dataclass(frozen=True)
class InstanceRef:
    """A referenced SOP instance and what is known of it ('' / None = not known from this source)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    availability: str = ""
    retrieve_ae_title: str = ""
    mpps_uid: str = ""
    procedure_fk: int | None = None


def record_instances(db: Connection, instances: Iterable[InstanceRef], now: datetime) -> int:
    """Insert new instances, fill in what ``instances`` adds to known ones; returns how many were given."""
    wanted = {i.sop_instance_uid: i for i in instances if i.sop_instance_uid}
    if not wanted:
        return 0
    known: set[str] = set()
    uids = list(wanted)
    for start in range(0, len(uids), 500):
        known.update(db.execute(_KNOWN, {"uids": uids[start:start + 500]}).scalars())
    new = [_row(i, now) for uid, i in wanted.items() if uid not in known]
    if new:
        db.execute(_INSERT, new)
    for uid in known:
        changes = {k: v for k, v in _row(wanted[uid], now).items() if v not in ("", None)}
        db.execute(update(INSTANCES).where(INSTANCES.c.sop_instance_uid == uid).values(changes))
    return len(wanted)


def _row(instance: InstanceRef, now: datetime) -> dict[str, object]:
    return {"sop_instance_uid": instance.sop_instance_uid, "sop_class_uid": instance.sop_class_uid,
            "series_instance_uid": instance.series_instance_uid, "study_instance_uid": instance.study_instance_uid,
            "availability": instance.availability, "retrieve_ae_title": instance.retrieve_ae_title,
            "mpps_uid": instance.mpps_uid, "procedure_fk": instance.procedure_fk, "updated_at": now}


def procedure_instances(db: Connection, procedure_pk: int) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of every instance known for the procedure, in a stable order."""
    return [(r.sop_class_uid, r.sop_instance_uid) for r in db.execute(
        select(INSTANCES.c.sop_class_uid, INSTANCES.c.sop_instance_uid)
        .where(INSTANCES.c.procedure_fk == procedure_pk).order_by(INSTANCES.c.sop_instance_uid))]
