"""Retention benchmark: does the database stay bounded, and the worklist query flat, over months?

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/retention.py                                # 90 days x 2,000 orders, PostgreSQL
    .venv/bin/python bench/retention.py --days 40 --per-day 500 --backends postgresql,sqlite
    .venv/bin/python bench/retention.py --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

It simulates ``--days`` days of a department with a clock of its own. Each simulated day:

1. ``--per-day`` orders for that day are written straight into the broker's tables (Core bulk inserts,
   the rows the HL7 intake and the MPPS service would have written, not through them: the intake's
   speed is another benchmark's subject): the archived ORM^O01 (about 1 KB) with its ACK, order,
   requested procedure, step (the worklist item as DICOM JSON), step and procedure transitions. The
   mix: 85 % performed (MPPS IN PROGRESS then COMPLETED: an MPPS instance with 20 image references,
   two HL7 status events to the RIS, done), 7 % cancelled by the RIS (ORM CA archived too), 8 % never
   started (left SCHEDULED: the retention discontinues them, and the RIS status that queues is then
   marked done, as the relay would). 60 % of the orders are for a new patient. The audit trail gets
   what the broker records for them: an Order Record per order (and per cancel), a Procedure Record
   per MPPS change, and a Query record per worklist C-FIND (``--queries-per-day``).
2. At 20:00 the retention pass runs with the default settings (30 days for procedures and HL7, 7 for
   the outbox, 24 h grace, timeline exported to a temporary directory, audit on) and a simulated ``now``,
   and the audit retention (``--audit-days``, default 180 as ``BROKER_AUDIT_RETENTION_DAYS``).
3. PostgreSQL: ``VACUUM ANALYZE`` of the tables, standing in for the autovacuum runs a real day has time
   for (``--no-vacuum`` leaves it to autovacuum, which the compressed time outruns).
4. The size of the database (``pg_database_size``; SQLite: the file and its WAL) and the time of two
   worklist queries through the broker's own finder (:class:`broker.mwl.finder.WorklistFinder`, all
   responses read): *station* (CT01, that day) and *broad* (modality CT, the week up to that day), each
   the median of ``--queries`` runs.

It prints a table every ``--every`` days (and the first and last day), then the rows per table at the
end. A steady state is reached after the longest retention (``--audit-days``, or
``retention_procedure_days`` + a few days when that is longer): from then on each day adds as much as
it removes.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import string
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from sqlalchemy import Engine, create_engine, func, insert, select, text, update  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from broker.audit import events as audit_events  # noqa: E402
from broker.audit import trail  # noqa: E402
from broker.audit.events import Source  # noqa: E402
from broker.audit.shipper import purge_expired  # noqa: E402
from broker.config import Settings, load_settings  # noqa: E402
from broker.dicom_json import element  # noqa: E402
from broker.domain import worklist_item  # noqa: E402
from broker.mwl.finder import WorklistFinder  # noqa: E402
from broker.outbox.outbox import OUTBOX  # noqa: E402
from broker.retention import apply_retention  # noqa: E402
from broker.store import migrate  # noqa: E402
from broker.store.session import make_engine  # noqa: E402
from broker.store.tables import (  # noqa: E402
    MPPS,
    ORDERS,
    PATIENTS,
    PROCEDURE_TRANSITIONS,
    PROCEDURES,
    STEP_TRANSITIONS,
    STEPS,
    AuditRecord,
    AuditRecordPatient,
    InboundMessage,
    table_of,
)

MESSAGES, AUDIT, AUDIT_PATIENTS = table_of(InboundMessage), table_of(AuditRecord), table_of(AuditRecordPatient)
TABLES = (PATIENTS, ORDERS, PROCEDURES, STEPS, STEP_TRANSITIONS, PROCEDURE_TRANSITIONS, MESSAGES, MPPS, OUTBOX, AUDIT,
          AUDIT_PATIENTS)
STATIONS = (("CT01", "CT"), ("CT02", "CT"), ("CT03", "CT"), ("MR01", "MR"), ("MR02", "MR"), ("US01", "US"),
            ("US02", "US"), ("CR01", "CR"), ("DX01", "DX"), ("MG01", "MG"))
FIRST_DAY = datetime(2026, 1, 5)
UID = "1.2.826.0.1.3680043.10.543.7"
SENDER = "RIS^GENHOSP"
ORM = ("MSH|^~\\&|RIS|GENHOSP|WLBROKER|RADIOLOGY|{when}||ORM^O01|{control}|P|2.3.1||||||8859/1\r"
       "PID|1||{pid}^^^GENHOSP^MR||{name}||19700101|F|||MAIN STREET 1^^CITY^^12345||0123456789\r"
       "PV1|1|O|RAD^101^A^GENHOSP||||1234^REFERRER^RITA|||||||||||{visit}\r"
       "ORC|{control_code}|{placer}^RIS|{filler}^RADRIS||SC||^^^{start}^^R||{when}|||1234^REFERRER^RITA\r"
       "OBR|1|{placer}^RIS|{filler}^RADRIS|{code}^{code} EXAMINATION^LOCAL|||{when}|||||||||1234^REFERRER^RITA"
       "||{accession}|{rp}|{sps}||||{modality}|||1^^^{start}^^R\r"
       "ZDS|{study}^RADRIS^Application^DICOM\r")


class Simulation:
    """The department's rows, written day by day with a simulated clock."""

    def __init__(self, engine: Engine, per_day: int, seed: int, queries_per_day: int = 0) -> None:
        self.engine = engine
        self.per_day = per_day
        self.queries_per_day = queries_per_day
        self.audit: list[tuple[audit_events.AuditEvent, datetime]] = []
        self.broker = trail.broker_participant("WLBROKER")
        self.random = random.Random(seed)
        self.next_id = {"patients": 1, "orders": 1, "messages": 1, "mpps": 1}
        self.recent_patients: deque[tuple[int, str, str]] = deque(maxlen=5000)

    def _id(self, name: str) -> int:
        value = self.next_id[name]
        self.next_id[name] = value + 1
        return value

    def day(self, day: datetime) -> None:
        """Write one day's orders and what happened to them (one transaction per 1,000 orders)."""
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in ("patients", "orders", "procedures", "steps",
                                                                       "step_transitions", "timeline", "messages",
                                                                       "mpps", "outbox")}
        for number in range(self.per_day):
            self._order(day, number, rows)
            if len(rows["orders"]) >= 1000:
                self._write(rows)
        self._queries(day)
        self._write(rows)

    def _queries(self, day: datetime) -> None:
        """The day's worklist C-FINDs, each a Query record (the modalities poll from 07:00 to 19:00)."""
        for number in range(self.queries_per_day):
            station, modality = STATIONS[number % len(STATIONS)]
            at = day + timedelta(hours=7, seconds=number * 43200 // max(1, self.queries_per_day))
            identifier = (f"(0040,0100) SQ ScheduledProcedureStepSequence: Modality={modality} "
                          f"ScheduledStationAETitle={station} ScheduledProcedureStepStartDate={day:%Y%m%d} "
                          "PatientName PatientID AccessionNumber StudyInstanceUID RequestedProcedureID").encode()
            self.audit.append((audit_events.query(Source(station, "10.0.1.17", "dicom"), self.broker,
                                                  what="1.2.840.10008.5.1.4.31", query_bytes=identifier), at))

    def _audit_order(self, at: datetime, action: audit_events.Action, patient_id: str, accession: str,
                     study: str) -> None:
        self.audit.append((audit_events.order_record(action, Source(SENDER, "10.0.0.5", "hl7"), self.broker,
                                                     patient_id=f"{patient_id}^^^GENHOSP",
                                                     accession_number=accession, study_uid=study), at))

    def _audit_step(self, at: datetime, station: str, patient_id: str, accession: str, study: str, sps: str,
                    description: str) -> None:
        self.audit.append((audit_events.procedure_record("U", Source(station, "10.0.1.17", "dicom"), self.broker,
                                                         patient_id=f"{patient_id}^^^GENHOSP", study_uid=study,
                                                         accession_number=accession, step_id=sps,
                                                         description=description), at))

    def _write(self, rows: dict[str, list[dict[str, Any]]]) -> None:
        tables = {"messages": MESSAGES, "patients": PATIENTS, "orders": ORDERS, "procedures": PROCEDURES,
                  "steps": STEPS, "step_transitions": STEP_TRANSITIONS, "timeline": PROCEDURE_TRANSITIONS, "mpps": MPPS,
                  "outbox": OUTBOX}
        with self.engine.begin() as db:
            for name, table in tables.items():
                if rows[name]:
                    db.execute(insert(table), rows[name])
                    rows[name].clear()
            for start in range(0, len(self.audit), 1000):
                trail.record_many(db, self.audit[start:start + 1000])
            self.audit.clear()

    def _patient(self, created: datetime, rows: dict[str, list[dict[str, Any]]]) -> tuple[int, str, str]:
        if self.recent_patients and self.random.random() > 0.6:
            return self.recent_patients[self.random.randrange(len(self.recent_patients))]
        pk = self._id("patients")
        patient_id, name = f"P{pk:08d}", f"DOE{pk}^JANE"
        attributes = {"00100010": element("PatientName", name), "00100020": element("PatientID", patient_id),
                      "00100021": element("IssuerOfPatientID", "GENHOSP"),
                      "00100030": element("PatientBirthDate", "19700101"), "00100040": element("PatientSex", "F")}
        rows["patients"].append({"id": pk, "patient_id": patient_id, "issuer": "GENHOSP", "patient_name": name,
                                 "birth_date": "19700101", "sex": "F", "attributes": attributes,
                                 "merged_into_id": None, "created_at": created, "updated_at": created})
        patient = (pk, patient_id, name)
        self.recent_patients.append(patient)
        return patient

    def _order(self, day: datetime, number: int, rows: dict[str, list[dict[str, Any]]]) -> None:
        ordered = day - timedelta(hours=6)  # the evening before
        start = day + timedelta(hours=7, minutes=(number * 720 // self.per_day))
        station, modality = STATIONS[number % len(STATIONS)]
        patient_pk, patient_id, name = self._patient(ordered, rows)
        pk = self._id("orders")
        accession, sps, study = f"A{pk:09d}", f"S{pk:09d}", f"{UID}.{pk}"
        fate = self.random.random()
        status = "COMPLETED" if fate < 0.85 else "CANCELED" if fate < 0.92 else "SCHEDULED"
        message_pk = self._message(ordered, "NW", pk, patient_id, name, accession, sps, study, modality, start, rows)
        self._audit_order(ordered, "C", patient_id, accession, study)
        rows["orders"].append({"id": pk, "patient_fk": patient_pk, "sender": SENDER, "placer_order_number": f"PL{pk}",
                               "placer_issuer": "RIS", "filler_order_number": f"FL{pk}", "filler_issuer": "RADRIS",
                               "order_control": "NW", "order_status": "SC", "created_at": ordered,
                               "updated_at": ordered})
        mapped = {
            "00080050": element("AccessionNumber", accession), "00401001": element("RequestedProcedureID", f"R{pk}"),
            "0020000D": element("StudyInstanceUID", study),
            "00321060": element("RequestedProcedureDescription", f"{modality} EXAMINATION"),
            "00080090": element("ReferringPhysicianName", "REFERRER^RITA"),
            "00400100": {"vr": "SQ", "Value": [{
                "00080060": element("Modality", modality), "00400001": element("ScheduledStationAETitle", station),
                "00400002": element("ScheduledProcedureStepStartDate", f"{start:%Y%m%d}"),
                "00400003": element("ScheduledProcedureStepStartTime", f"{start:%H%M%S}"),
                "00400009": element("ScheduledProcedureStepID", sps),
                "00400007": element("ScheduledProcedureStepDescription", f"{modality} EXAMINATION"),
                "00400006": element("ScheduledPerformingPhysicianName", "TECH^TOM")}]},
        }
        patient = {"00100010": element("PatientName", name), "00100020": element("PatientID", patient_id),
                   "00100021": element("IssuerOfPatientID", "GENHOSP")}
        item = worklist_item.build_item(mapped, patient, status)
        ended = start + timedelta(minutes=20)
        changed = ordered if status == "SCHEDULED" else ended
        rows["procedures"].append({"id": pk, "order_fk": pk, "requested_procedure_id": f"R{pk}",
                                   "accession_number": accession, "study_instance_uid": study,
                                   "description": f"{modality} EXAMINATION", "state": status,
                                   "created_at": ordered, "updated_at": changed})
        rows["steps"].append({"id": pk, "procedure_fk": pk, "patient_fk": patient_pk, "item": item,
                              "ups_instance_uid": f"{study}.1", "created_at": ordered, "updated_at": changed,
                              **worklist_item.index_columns(item)})
        steps = rows["step_transitions"]
        steps.append({"step_fk": pk, "at": ordered, "from_status": "", "to_status": "SCHEDULED",
                      "cause": f"HL7 ORM^O01 N{pk}", "inbound_message_fk": message_pk})
        if status == "COMPLETED":
            mpps_uid = f"{study}.2"
            cause = f"MPPS {mpps_uid}"
            steps.append({"step_fk": pk, "at": start, "from_status": "SCHEDULED", "to_status": "STARTED",
                          "cause": cause, "inbound_message_fk": None})
            steps.append({"step_fk": pk, "at": ended, "from_status": "STARTED", "to_status": "COMPLETED",
                          "cause": cause, "inbound_message_fk": None})
            for at, old, new in ((start, "SCHEDULED", "STARTED"), (ended, "STARTED", "COMPLETED")):
                self._audit_step(at, station, patient_id, accession, study, sps,
                                 "MPPS IN PROGRESS" if new == "STARTED" else "MPPS COMPLETED")
                rows["timeline"].append({"procedure_fk": pk, "at": at, "from_state": old, "to_state": new,
                                         "cause": cause, "event_kind": "mpps", "event_ref": mpps_uid,
                                         "inbound_message_fk": None})
                rows["outbox"].append({"event_id": f"{pk}-{new}", "kind": "ris.status",
                                       "payload": {"procedure_pk": pk, "state": new, "accession_number": accession},
                                       "ordering_key": f"order:{pk}", "status": "done", "attempts": 1,
                                       "next_attempt_at": at, "lease_until": None, "last_error": "",
                                       "created_at": at, "done_at": at})
            images = [{"00081150": element("ReferencedSOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),
                       "00081155": element("ReferencedSOPInstanceUID", f"{study}.3.{n}")} for n in range(20)]
            dataset = {"00400252": element("PerformedProcedureStepStatus", "COMPLETED"),
                       "00400340": {"vr": "SQ", "Value": [{"0020000E": element("SeriesInstanceUID", f"{study}.3"),
                                                           "00081140": {"vr": "SQ", "Value": images}}]}}
            rows["mpps"].append({"id": self._id("mpps"), "sop_instance_uid": mpps_uid, "status": "COMPLETED",
                                 "step_fk": pk, "procedure_fk": pk, "study_instance_uid": study, "calling_ae": station,
                                 "dataset": dataset, "unscheduled": False, "created_at": start, "updated_at": ended})
        elif status == "CANCELED":
            cancel_pk = self._message(start - timedelta(hours=2), "CA", pk, patient_id, name, accession, sps, study,
                                      modality, start, rows)
            cause = f"HL7 ORM^O01 C{pk}"
            self._audit_order(start - timedelta(hours=2), "D", patient_id, accession, study)
            steps.append({"step_fk": pk, "at": start, "from_status": "SCHEDULED", "to_status": "CANCELED",
                          "cause": cause, "inbound_message_fk": cancel_pk})
            rows["timeline"].append({"procedure_fk": pk, "at": start, "from_state": "SCHEDULED",
                                     "to_state": "CANCELED", "cause": cause, "event_kind": "hl7",
                                     "event_ref": f"C{pk}", "inbound_message_fk": cancel_pk})

    def _message(self, at: datetime, control: str, pk: int, patient_id: str, name: str, accession: str, sps: str,
                 study: str, modality: str, start: datetime, rows: dict[str, list[dict[str, Any]]]) -> int:
        message_pk = self._id("messages")
        control_id = f"{control[0]}{pk}"
        raw = ORM.format(when=f"{at:%Y%m%d%H%M%S}", control=control_id, pid=patient_id, name=name, visit=f"V{pk}",
                         control_code=control, placer=f"PL{pk}", filler=f"FL{pk}", start=f"{start:%Y%m%d%H%M%S}",
                         code=modality, accession=accession, rp=f"R{pk}", sps=sps, modality=modality,
                         study=study).encode("latin-1")
        ack = (f"MSH|^~\\&|WLBROKER|RADIOLOGY|RIS|GENHOSP|{at:%Y%m%d%H%M%S}||ACK^O01|A{control_id}|P|2.3.1\r"
               f"MSA|AA|{control_id}|1 step(s) scheduled\r").encode()
        rows["messages"].append({"id": message_pk, "received_at": at, "processed_at": at, "peer": "10.0.0.5",
                                 "sender": SENDER, "control_id": control_id, "message_type": "ORM^O01", "raw": raw,
                                 "charset": "8859/1", "status": "accepted", "ack_code": "AA", "ack": ack, "error": "",
                                 "duplicate_of_id": None})
        return message_pk


def relay_done(engine: Engine, now: datetime) -> None:
    """What the relay would have done by the evening: every event queued today is delivered."""
    with engine.begin() as db:
        db.execute(update(OUTBOX).where(OUTBOX.c.status == "pending").values(status="done", done_at=now))


def database_size(engine: Engine, url: str) -> int:
    if engine.dialect.name == "postgresql":
        with engine.connect() as db:
            return int(db.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
    path = Path(make_url(url).database or "")
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def vacuum(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
        for table in TABLES:
            db.execute(text(f"VACUUM ANALYZE {table.name}"))


def query_ms(finder: WorklistFinder, station: str, dates: str, modality: str, runs: int) -> tuple[float, int]:
    """Median milliseconds of a worklist query (every response read) and how many it returned."""
    identifier = Dataset()
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID"):
        setattr(identifier, keyword, "")
    step = Dataset()
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = dates
    step.Modality = modality
    step.ScheduledProcedureStepID = ""
    step.ScheduledProcedureStepStatus = ""
    identifier.ScheduledProcedureStepSequence = [step]
    times, found = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        found = sum(1 for _ in finder.find(identifier, "BENCH").json_responses)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), found


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as db:
        return {t.name: int(db.execute(select(func.count()).select_from(t)).scalar_one()) for t in TABLES}


@contextlib.contextmanager
def database(backend: str, pg_url: str, directory: Path) -> Iterator[str]:
    """A fresh database of ``backend``: a SQLite file, or ``bench_<random>`` on ``pg_url`` dropped at the end."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'broker.db'}"
        return
    name = "bench_" + "".join(random.choices(string.ascii_lowercase + string.digits, k=10))
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as db:
            db.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as db:
                db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def run(backend: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp, \
            database(backend, args.pg_url, Path(tmp)) as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        settings: Settings = load_settings(database_url=url, retention_export_dir=str(Path(tmp) / "export"),
                                           ris_hl7_address="127.0.0.1:2576", retention_batch_size=args.batch_size)
        simulation = Simulation(engine, args.per_day, args.seed, args.queries_per_day)
        finder = WorklistFinder(engine)
        print(f"\n{backend}: {args.days} days x {args.per_day} orders/day, {args.queries_per_day} queries/day, "
              f"audit kept {args.audit_days} days, batch {args.batch_size}", flush=True)
        header = (f"{'day':>4} {'orders':>8} {'size MB':>8} {'steps':>7} {'messages':>8} {'outbox':>7} {'audit':>8} "
                  f"{'load s':>6} {'purge s':>7} {'purged':>6} {'disc.':>5} {'station ms':>10} {'n':>3} "
                  f"{'broad ms':>8} {'n':>5}")
        print(header)
        totals = {"load": 0.0, "purge": 0.0}
        for number in range(args.days):
            day = FIRST_DAY + timedelta(days=number)
            started = time.perf_counter()
            simulation.day(day)
            loaded = time.perf_counter() - started
            evening = day + timedelta(hours=20)
            started = time.perf_counter()
            report = apply_retention(settings, engine, evening)
            purge_expired(engine, args.audit_days, evening)
            purged = time.perf_counter() - started
            relay_done(engine, evening)
            if backend == "postgresql" and not args.no_vacuum:
                vacuum(engine)
            totals["load"] += loaded
            totals["purge"] += purged
            if number in (0, args.days - 1) or (number + 1) % args.every == 0:
                rows = counts(engine)
                station_ms, station_n = query_ms(finder, "CT01", f"{day:%Y%m%d}", "CT", args.queries)
                week = f"{day - timedelta(days=6):%Y%m%d}-{day:%Y%m%d}"
                broad_ms, broad_n = query_ms(finder, "", week, "CT", args.queries)
                print(f"{number + 1:>4} {simulation.next_id['orders'] - 1:>8} "
                      f"{database_size(engine, url) / 1e6:>8.1f} {rows['scheduled_steps']:>7} "
                      f"{rows['inbound_messages']:>8} {rows['outbox']:>7} {rows['audit_records']:>8} "
                      f"{loaded:>6.1f} {purged:>7.2f} "
                      f"{report.procedures_purged:>6} {report.stale_steps_discontinued:>5} {station_ms:>10.2f} "
                      f"{station_n:>3} {broad_ms:>8.2f} {broad_n:>5}", flush=True)
        print(f"total: load {totals['load']:.0f} s, retention passes {totals['purge']:.0f} s")
        print("rows per table at the end: " + ", ".join(f"{k} {v}" for k, v in counts(engine).items()))
        if backend == "postgresql":
            with engine.connect() as db:
                sizes = {t.name: int(db.execute(text(f"SELECT pg_total_relation_size('{t.name}')")).scalar_one())
                         for t in TABLES}
            print("MB per table (with indexes and TOAST): "
                  + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sizes.items()))
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--per-day", type=int, default=2000)
    parser.add_argument("--backends", default="postgresql", help="comma separated: postgresql, sqlite")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10, help="print a line every N days")
    parser.add_argument("--queries", type=int, default=15, help="runs of each query, the median is shown")
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument("--queries-per-day", type=int, default=7200,
                        help="worklist C-FINDs a day, each a Query record (50 modalities polling every 5 min, 12 h)")
    parser.add_argument("--audit-days", type=int, default=180,
                        help="BROKER_AUDIT_RETENTION_DAYS: the audit records' retention")
    parser.add_argument("--no-vacuum", action="store_true", help="PostgreSQL: leave dead rows to autovacuum")
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # the passes' log lines off the table
    for backend in args.backends.split(","):
        run(backend.strip(), args)


if __name__ == "__main__":
    main()
