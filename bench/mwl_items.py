"""Worklist items for the MWL C-FIND benchmark: a seeded generator, the two queries, and the bulk loaders.

Used by ``bench/mwl_query.py``; it also runs alone, e.g. to look at the spread or to fill a database by
hand (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/mwl_items.py --size 10000                     # spread and expected counts
    .venv/bin/python bench/mwl_items.py --size 10000 --database sqlite:////tmp/mwl.db --wl-dir /tmp/wl

**The spread.** 50 stations of 9 modalities (``CT01``..``CT08``, ``MR01``.., ``US``, ``CR``, ``DX``, ``MG``,
``XA``, ``NM``, ``RF01``/``RF02``). Every station has 20 items a day at fixed slots every 30 minutes from
08:00, except the two fluoroscopy rooms with 14; that is 988 items a day. N items cover
``ceil(N / 988)`` consecutive days ending 6 days after *today* (so the week from today is always full);
only the oldest day is partial. So the days grow with N -- 10k items are 11 days, 100k are 102 days
(about 3 months), 1M are 1,013 days (about 2.8 years) -- and every query of a day or a week sees the
same number of items at every size:

- **typical**: Scheduled Station AE Title ``CT01``, SPS Start Date *today*, Modality ``CT``: **20** items;
- **broad**: SPS Start Date *today* .. *today+6* (a week), Modality ``RF``: 7 x 28 = **196** items.

Items are what the broker makes of an HL7 v2.5.1 OMI^O23 order (one order, one requested procedure and
one step per item; MSH-18 8859/1, so Specific Character Set ISO_IR 100 and Latin-1 names): the generator
builds the mapped item and the patient's attributes directly, then :func:`worklist_item.build_item` and
:func:`worklist_item.index_columns` as the domain service does. :func:`check_against_mapping` renders
sample items as HL7 messages, maps them with the broker's own mapping (``mappings/``) and requires the
same item, so the generator cannot drift from the broker. About 0.6 N patients (1.7 items each), all
steps SCHEDULED.

The same items are written as DICOM worklist files (``*.wl``, DICOM Part 10) for DCMTK ``wlmscpfs``
and the Orthanc ModalityWorklists plugin.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian  # noqa: E402

from broker.dicom_json import JsonDataset, element, tag_of  # noqa: E402
from broker.domain import worklist_item  # noqa: E402

SEED = 20261123
UID_ROOT = "1.2.826.0.1.3680043.10.543.9"  # the project's bench root + ".9" (MWL items)
MWL_FIND_SOP_CLASS = "1.2.840.10008.5.1.4.31"
SENDING_APPLICATION, SENDING_FACILITY = "RIS", "GENHOSP"
FILLER_APPLICATION = "RADRIS"
ISSUER = "GENHOSP"
STATUS = "SCHEDULED"
PATIENTS_PER_ITEM = 0.6
FIRST_SLOT_MINUTES = 8 * 60
SLOT_MINUTES = 30
WEEK_DAYS = 7


@dataclass(frozen=True)
class Station:
    ae_title: str
    modality: str
    per_day: int
    name: str  # Scheduled Station Name (SH)
    location: str  # Scheduled Procedure Step Location (SH)


def _stations() -> tuple[Station, ...]:
    rooms = [("CT", 8, "CT SUITE"), ("MR", 6, "MRI SUITE"), ("US", 8, "ULTRASOUND"), ("CR", 10, "XRAY"),
             ("DX", 6, "XRAY"), ("MG", 4, "BREAST CENTER"), ("XA", 3, "ANGIO"), ("NM", 3, "NUC MED"),
             ("RF", 2, "FLUORO")]
    stations = []
    for modality, count, location in rooms:
        for number in range(1, count + 1):
            stations.append(Station(f"{modality}{number:02d}", modality, 14 if modality == "RF" else 20,
                                    f"{modality} ROOM {number}", location))
    return tuple(stations)


STATIONS = _stations()
ITEMS_PER_DAY = sum(s.per_day for s in STATIONS)  # 988

# Per modality: (requested procedure code, meaning, protocol code, protocol meaning).
PROCEDURES: dict[str, list[tuple[str, str, str, str]]] = {
    "CT": [("CTHEAD", "CT HEAD WITHOUT CONTRAST", "CTHEAD1", "HEAD ROUTINE"),
           ("CTCHEST", "CT CHEST WITH CONTRAST", "CTCH2", "CHEST C+ 1MM"),
           ("CTABD", "CT ABDOMEN AND PELVIS", "CTABD1", "ABDOMEN PORTAL VENOUS"),
           ("CTSPINE", "CT LUMBAR SPINE", "CTLS1", "LUMBAR SPINE BONE")],
    "MR": [("MRBRAIN", "MR BRAIN WITH CONTRAST", "MRBR2", "BRAIN T1 T2 FLAIR C+"),
           ("MRKNEE", "MR KNEE LEFT", "MRKN1", "KNEE T1 SAG PD COR"),
           ("MRLSP", "MR LUMBAR SPINE", "MRLS1", "LSPINE T2 SAG AX")],
    "US": [("USABD", "US ABDOMEN COMPLETE", "USAB1", "ABDOMEN"),
           ("USTHY", "US THYROID", "USTH1", "THYROID"),
           ("USOB", "US OBSTETRIC 2ND TRIMESTER", "USOB2", "OB SECOND TRIMESTER")],
    "CR": [("CRCHEST", "XR CHEST PA AND LATERAL", "CRCH2", "CHEST 2 VIEWS"),
           ("CRHAND", "XR HAND RIGHT", "CRHA3", "HAND 3 VIEWS"),
           ("CRKNEE", "XR KNEE LEFT", "CRKN2", "KNEE 2 VIEWS")],
    "DX": [("DXCHEST", "DX CHEST PA", "DXCH1", "CHEST PA"),
           ("DXPELV", "DX PELVIS AP", "DXPE1", "PELVIS AP")],
    "MG": [("MGSCR", "MAMMOGRAPHY SCREENING BILATERAL", "MGSC4", "SCREENING 4 VIEWS"),
           ("MGDIA", "MAMMOGRAPHY DIAGNOSTIC LEFT", "MGDI2", "DIAGNOSTIC 2 VIEWS")],
    "XA": [("XACOR", "CORONARY ANGIOGRAPHY", "XACO1", "CORONARY LEFT RIGHT"),
           ("XAPER", "PERIPHERAL ANGIOGRAPHY", "XAPE1", "RUNOFF BILATERAL")],
    "NM": [("NMBONE", "NM BONE SCAN WHOLE BODY", "NMBO1", "WHOLE BODY 3H"),
           ("NMTHY", "NM THYROID SCINTIGRAPHY", "NMTH1", "THYROID TC99M")],
    "RF": [("RFSWAL", "FLUORO SWALLOW STUDY", "RFSW1", "BARIUM SWALLOW"),
           ("RFUGI", "FLUORO UPPER GI SERIES", "RFUG1", "UPPER GI DOUBLE CONTRAST")],
}
PRIORITIES = (("R", 0.85), ("A", 0.10), ("S", 0.05))  # HL7 -> ROUTINE, HIGH, STAT (mapping table "priority")
PRIORITY_TEXT = {"R": "ROUTINE", "A": "HIGH", "S": "STAT"}

FAMILY_NAMES = (
    "MÜLLER", "SCHMIDT", "SCHNEIDER", "FISCHER", "WEBER", "MEYER", "WAGNER", "BECKER", "SCHULZ", "HOFFMANN",
    "SCHÄFER", "KOCH", "BAUER", "RICHTER", "KLEIN", "WOLF", "SCHRÖDER", "NEUMANN", "SCHWARZ", "ZIMMERMANN",
    "BRAUN", "KRÜGER", "HOFMANN", "HARTMANN", "LANGE", "SCHMITT", "WERNER", "KRAUSE", "MEIER", "LEHMANN",
    "SMITH", "JOHNSON", "BROWN", "GARCÍA", "MARTÍNEZ", "LÓPEZ", "DUBOIS", "LEFÈVRE", "ROSSI", "RUSSO",
    "NOWAK", "KOWALSKI", "JANSSEN", "DE VRIES", "NIELSEN", "JENSEN", "HANSEN", "O'BRIEN", "MURPHY", "YILMAZ",
)
GIVEN_FEMALE = ("ERIKA", "ANNA", "MARIA", "SOPHIE", "LENA", "JULIA", "CLAIRE", "CHLOÉ", "INÉS", "SARAH",
                "HANNAH", "EMMA", "LAURA", "KATRIN", "BIRGIT", "ZOË", "ELIF", "AGNIESZKA", "INGRID", "FRIEDA")
GIVEN_MALE = ("HANS", "PETER", "THOMAS", "MICHAEL", "ANDREAS", "STEFAN", "JÖRG", "JÜRGEN", "FRANÇOIS", "JOSÉ",
              "LUCA", "MARCO", "JAN", "LARS", "SØREN", "PIOTR", "MEHMET", "DAVID", "PAUL", "RENÉ")
MIDDLE_INITIALS = "ABCDEFGHJKLMNPRSTW"
PHYSICIAN_NAMES = tuple((f"{3000 + i}", family, given)
                        for i, (family, given) in enumerate(zip(FAMILY_NAMES[::2], GIVEN_MALE + GIVEN_FEMALE,
                                                                strict=False)))
TECHNOLOGIST_NAMES = tuple((f"{7000 + i}", family, given)
                           for i, (family, given) in enumerate(zip(FAMILY_NAMES[1::2], GIVEN_FEMALE + GIVEN_MALE,
                                                                   strict=False)))
INPATIENT_WARDS = ("WARD1", "WARD2", "WARD3", "ICU", "CARD", "ORTHO")


# --------------------------------------------------------------------------------------------------
# the spread


@dataclass(frozen=True)
class Spread:
    """How ``size`` items lie in time: consecutive days ending ``WEEK_DAYS - 1`` days after ``today``."""

    size: int
    today: date
    seed: int = SEED

    @property
    def days(self) -> int:
        return max(1, math.ceil(self.size / ITEMS_PER_DAY))

    @property
    def last_day(self) -> date:
        return self.today + timedelta(days=WEEK_DAYS - 1)

    @property
    def first_day(self) -> date:
        return self.last_day - timedelta(days=self.days - 1)

    @property
    def patients(self) -> int:
        return max(1, round(self.size * PATIENTS_PER_ITEM))

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "seed": self.seed, "today": self.today.isoformat(), "days": self.days,
                "first_day": self.first_day.isoformat(), "last_day": self.last_day.isoformat(),
                "stations": len(STATIONS), "items_per_day": ITEMS_PER_DAY,
                "first_day_items": self.size - (self.days - 1) * ITEMS_PER_DAY, "patients": self.patients}


@dataclass(frozen=True)
class Person:
    id: str
    family: str
    given: str
    middle: str = ""
    prefix: str = ""

    @property
    def pn(self) -> str:
        """DICOM PN ``family^given^middle^prefix`` as the mapping writes it (trailing '^' removed)."""
        return "^".join((self.family, self.given, self.middle, self.prefix)).rstrip("^")


@dataclass(frozen=True)
class PatientFacts:
    number: int
    person: Person
    birth_date: str
    sex: str

    @property
    def patient_id(self) -> str:
        return f"P{self.number:08d}"


@dataclass(frozen=True)
class ItemFacts:
    """What one order says, in HL7 terms; :func:`mapped_item` and :func:`render_hl7` both start here."""

    number: int  # 1-based: the primary key of its order, requested procedure and step
    patient: PatientFacts
    station: Station
    day: date
    time: str  # HHMMSS
    procedure: tuple[str, str, str, str]
    priority: str  # HL7 code
    referring: Person
    requesting: Person
    performing: Person
    location: tuple[str, str, str]  # PV1-3 point of care, room, bed
    seed: int

    @property
    def start(self) -> str:
        return self.day.strftime("%Y%m%d") + self.time

    @property
    def accession(self) -> str:
        return f"A{self.number:09d}"

    @property
    def rp_id(self) -> str:
        return f"RP{self.number:09d}"

    @property
    def sps_id(self) -> str:
        return f"SP{self.number:09d}"

    @property
    def placer(self) -> str:
        return f"PO{self.number:09d}"

    @property
    def filler(self) -> str:
        return f"FO{self.number:09d}"

    @property
    def admission_id(self) -> str:
        return f"V{self.number:09d}"

    @property
    def study_uid(self) -> str:
        return f"{UID_ROOT}.{self.seed}.{self.number}"


def patient_facts(seed: int, number: int) -> PatientFacts:
    """Patient ``number`` (1-based): the same person in every item that names it."""
    rng = random.Random(seed * 1_000_003 + number)
    sex = "F" if rng.random() < 0.52 else "M"
    given = rng.choice(GIVEN_FEMALE if sex == "F" else GIVEN_MALE)
    middle = rng.choice(MIDDLE_INITIALS) if rng.random() < 0.3 else ""
    prefix = "DR" if rng.random() < 0.03 else ""
    birth = date(1930, 1, 1) + timedelta(days=rng.randrange(365 * 90))
    return PatientFacts(number, Person(f"P{number:08d}", rng.choice(FAMILY_NAMES), given, middle, prefix),
                        birth.strftime("%Y%m%d"), sex)


def _physician(entry: tuple[str, str, str], prefix: str) -> Person:
    return Person(entry[0], entry[1], entry[2], "", prefix)


def item_facts(spread: Spread) -> Iterator[ItemFacts]:
    """Every item of ``spread``, oldest day first, shuffled within each day (orders arrive mixed)."""
    rng = random.Random(spread.seed * 7_919 + spread.size)
    number = 0
    slots_per_day = [(station, slot) for station in STATIONS for slot in range(station.per_day)]
    first_day_items = spread.size - (spread.days - 1) * ITEMS_PER_DAY
    for day_index in range(spread.days):
        day = spread.first_day + timedelta(days=day_index)
        slots = list(slots_per_day)
        rng.shuffle(slots)
        if day_index == 0:
            slots = slots[:first_day_items]
        for station, slot in slots:
            number += 1
            minutes = FIRST_SLOT_MINUTES + slot * SLOT_MINUTES
            priority = rng.choices([p for p, _ in PRIORITIES], [w for _, w in PRIORITIES])[0]
            inpatient = rng.random() < 0.3
            location = ((rng.choice(INPATIENT_WARDS), str(rng.randrange(100, 400)), rng.choice("AB"))
                        if inpatient else ("RAD", "WAIT", str(rng.randrange(1, 4))))
            yield ItemFacts(
                number=number,
                patient=patient_facts(spread.seed, rng.randrange(spread.patients) + 1),
                station=station,
                day=day,
                time=f"{minutes // 60:02d}{minutes % 60:02d}00",
                procedure=rng.choice(PROCEDURES[station.modality]),
                priority=priority,
                referring=_physician(rng.choice(PHYSICIAN_NAMES), "DR"),
                requesting=_physician(rng.choice(PHYSICIAN_NAMES), "DR"),
                performing=_physician(rng.choice(TECHNOLOGIST_NAMES), ""),
                location=location,
                seed=spread.seed,
            )


# --------------------------------------------------------------------------------------------------
# items as the broker builds them


def _code_sequence(code: str, meaning: str) -> list[JsonDataset]:
    return [{tag_of("CodeValue"): element("CodeValue", code),
             tag_of("CodingSchemeDesignator"): element("CodingSchemeDesignator", "LOCAL"),
             tag_of("CodeMeaning"): element("CodeMeaning", meaning)}]


def patient_attributes(patient: PatientFacts) -> JsonDataset:
    """The patient-level attributes as stored (mapping output plus the identity the service adds)."""
    return {
        tag_of("PatientID"): element("PatientID", patient.patient_id),
        tag_of("IssuerOfPatientID"): element("IssuerOfPatientID", ISSUER),
        tag_of("OtherPatientIDsSequence"): element("OtherPatientIDsSequence", None),
        tag_of("PatientName"): element("PatientName", patient.person.pn),
        tag_of("PatientBirthDate"): element("PatientBirthDate", patient.birth_date),
        tag_of("PatientSex"): element("PatientSex", patient.sex),
    }


def mapped_item(facts: ItemFacts) -> JsonDataset:
    """The item the default mapping makes of :func:`render_hl7` (without patient attributes and status)."""
    code, meaning, protocol_code, protocol_meaning = facts.procedure
    station = facts.station
    step: JsonDataset = {
        tag_of("Modality"): element("Modality", station.modality),
        tag_of("ScheduledProcedureStepID"): element("ScheduledProcedureStepID", facts.sps_id),
        tag_of("ScheduledProcedureStepStartDate"): element("ScheduledProcedureStepStartDate", facts.start[:8]),
        tag_of("ScheduledProcedureStepStartTime"): element("ScheduledProcedureStepStartTime", facts.time),
        tag_of("ScheduledProcedureStepDescription"): element("ScheduledProcedureStepDescription",
                                                             protocol_meaning),
        tag_of("ScheduledProtocolCodeSequence"): element("ScheduledProtocolCodeSequence",
                                                         _code_sequence(protocol_code, protocol_meaning)),
        tag_of("ScheduledPerformingPhysicianName"): element("ScheduledPerformingPhysicianName",
                                                            facts.performing.pn),
        tag_of("ScheduledStationName"): element("ScheduledStationName", station.name),
        tag_of("ScheduledProcedureStepLocation"): element("ScheduledProcedureStepLocation", station.location),
        tag_of("ScheduledStationAETitle"): element("ScheduledStationAETitle", station.ae_title),
    }
    return {
        tag_of("SpecificCharacterSet"): element("SpecificCharacterSet", "ISO_IR 100"),
        tag_of("CurrentPatientLocation"): element("CurrentPatientLocation", " ".join(facts.location)),
        tag_of("ReferringPhysicianName"): element("ReferringPhysicianName", facts.referring.pn),
        tag_of("AdmissionID"): element("AdmissionID", facts.admission_id),
        tag_of("PlacerOrderNumberImagingServiceRequest"): element("PlacerOrderNumberImagingServiceRequest",
                                                                  facts.placer),
        tag_of("FillerOrderNumberImagingServiceRequest"): element("FillerOrderNumberImagingServiceRequest",
                                                                  facts.filler),
        tag_of("AccessionNumber"): element("AccessionNumber", facts.accession),
        tag_of("RequestedProcedureID"): element("RequestedProcedureID", facts.rp_id),
        tag_of("RequestedProcedureDescription"): element("RequestedProcedureDescription", meaning),
        tag_of("RequestedProcedureCodeSequence"): element("RequestedProcedureCodeSequence",
                                                          _code_sequence(code, meaning)),
        tag_of("RequestedProcedurePriority"): element("RequestedProcedurePriority",
                                                      PRIORITY_TEXT[facts.priority]),
        tag_of("RequestingPhysician"): element("RequestingPhysician", facts.requesting.pn),
        tag_of("StudyInstanceUID"): element("StudyInstanceUID", facts.study_uid),
        tag_of("ScheduledProcedureStepSequence"): element("ScheduledProcedureStepSequence", [step]),
    }


def stored_item(facts: ItemFacts) -> JsonDataset:
    """The stored worklist item: the mapped item with the patient's attributes and SPS Status."""
    return worklist_item.build_item(mapped_item(facts), patient_attributes(facts.patient), STATUS)


# --------------------------------------------------------------------------------------------------
# HL7 rendering and the check against the broker's mapping


def _segment(name: str, fields: dict[int, str]) -> str:
    values = [""] * max(fields)
    for index, value in fields.items():
        values[index - 1] = value
    return "|".join([name, *values])


def _xcn(person: Person) -> str:
    return f"{person.id}^{person.family}^{person.given}^{person.middle}^^{person.prefix}"


def render_hl7(facts: ItemFacts) -> bytes:
    """The OMI^O23 (v2.5.1, MSH-18 8859/1) a RIS would send for this item, encoded in Latin-1."""
    p = facts.patient
    code, meaning, protocol_code, protocol_meaning = facts.procedure
    sent = (datetime.combine(facts.day, datetime.min.time()) - timedelta(days=3)).strftime("%Y%m%d%H%M%S")
    segments = [
        "MSH|^~\\&|" + "|".join([SENDING_APPLICATION, SENDING_FACILITY, "WLBROKER", "RADIOLOGY", sent, "",
                                 "OMI^O23^OMI_O23", f"B{facts.number:09d}", "P", "2.5.1", "", "", "AL", "NE", "",
                                 "8859/1"]),
        _segment("PID", {1: "1", 3: f"{p.patient_id}^^^{ISSUER}^MR",
                         5: f"{p.person.family}^{p.person.given}^{p.person.middle}^^{p.person.prefix}",
                         7: p.birth_date, 8: p.sex}),
        _segment("PV1", {1: "1", 2: "I" if facts.location[0] != "RAD" else "O",
                         3: "^".join(facts.location) + f"^{ISSUER}", 8: _xcn(facts.referring),
                         19: facts.admission_id}),
        _segment("ORC", {1: "NW", 2: f"{facts.placer}^{SENDING_APPLICATION}",
                         3: f"{facts.filler}^{FILLER_APPLICATION}", 5: "SC", 9: sent, 12: _xcn(facts.requesting)}),
        _segment("TQ1", {1: "1", 7: facts.start, 9: facts.priority}),
        _segment("OBR", {1: "1", 2: f"{facts.placer}^{SENDING_APPLICATION}",
                         3: f"{facts.filler}^{FILLER_APPLICATION}", 4: f"{code}^{meaning}^LOCAL",
                         16: _xcn(facts.requesting), 24: facts.station.modality, 34: _xcn(facts.performing)}),
        _segment("IPC", {1: f"{facts.accession}^{ISSUER}", 2: facts.rp_id, 3: facts.study_uid, 4: facts.sps_id,
                         5: facts.station.modality, 6: f"{protocol_code}^{protocol_meaning}^LOCAL",
                         7: facts.station.name, 8: facts.station.location, 9: facts.station.ae_title}),
    ]
    return "\r".join(segments).encode("latin-1") + b"\r"


def check_against_mapping(facts: Iterable[ItemFacts]) -> int:
    """Maps :func:`render_hl7` of each item with the broker's mapping; raises if any item differs.

    Returns the number of items checked.
    """
    from broker.config import load_settings
    from broker.hl7.ack import Header
    from broker.hl7.message import parse
    from broker.mapping.charsets import message_charset
    from broker.mapping.engine import Mapper
    from broker.mapping.rules import load_mappings

    settings = load_settings()
    mappings_dir = settings.mappings_dir if settings.mappings_dir.is_absolute() else ROOT / settings.mappings_dir
    mappings = load_mappings(mappings_dir)
    checked = 0
    for f in facts:
        raw = render_hl7(f)
        header = Header.from_raw(raw)
        mapping = mappings.for_sender(header.sending_application, header.sending_facility)
        charset = message_charset(header.character_set, mapping.default_character_set)
        mapper = Mapper(parse(raw.decode(charset.python_codec)), mapping, charset, settings.uid_root)
        patient = mapper.map_patient()
        orders = mapper.map_orders()
        mapper.raise_problems()
        assert patient is not None
        steps = [(o, p, s) for o in orders for p in o.procedures for s in p.steps]
        if len(steps) != 1:
            raise AssertionError(f"item {f.number}: the mapping made {len(steps)} steps of one")
        order, procedure, step = steps[0]
        identity = {tag_of("PatientID"): element("PatientID", patient.key.patient_id),
                    tag_of("IssuerOfPatientID"): element("IssuerOfPatientID", patient.key.issuer)}
        expected = worklist_item.build_item(step.item, {**patient.attributes, **identity}, STATUS)
        mine = stored_item(f)
        facts_ok = ((patient.key.patient_id, patient.key.issuer) == (f.patient.patient_id, ISSUER)
                    and (order.placer_order_number, order.filler_order_number) == (f.placer, f.filler)
                    and (procedure.requested_procedure_id, procedure.accession_number,
                         procedure.study_instance_uid) == (f.rp_id, f.accession, f.study_uid))
        if mine != expected or not facts_ok:
            differing = sorted(k for k in set(mine) | set(expected) if mine.get(k) != expected.get(k))
            raise AssertionError(
                f"item {f.number}: the generator no longer builds what the broker's mapping makes of the order "
                f"(differing tags {differing}; ids equal: {facts_ok}).\nmapping: "
                f"{json.dumps({k: expected.get(k) for k in differing}, ensure_ascii=False)}\ngenerator: "
                f"{json.dumps({k: mine.get(k) for k in differing}, ensure_ascii=False)}")
        checked += 1
    return checked


def sample_for_check(spread: Spread, first: int = 50, every: int = 97, until: int = 20_000) -> Iterator[ItemFacts]:
    """The first ``first`` items and every ``every``-th one up to item ``until`` (~250 items, any size)."""
    for f in item_facts(spread):
        if f.number > until:
            return
        if f.number <= first or f.number % every == 0:
            yield f


# --------------------------------------------------------------------------------------------------
# the queries


@dataclass(frozen=True)
class QuerySpec:
    """One worklist query of the benchmark: its matching keys and its calling AE title."""

    name: str
    calling_ae: str
    station_ae: str  # '' = no station key (universal)
    start_date: str  # DA value or range "YYYYMMDD-YYYYMMDD"
    modality: str
    description: str

    def matches(self, f: ItemFacts) -> bool:
        day = f.start[:8]
        first, _, last = self.start_date.partition("-")
        in_dates = first <= day <= last if last else day == first
        return (in_dates and f.station.modality == self.modality
                and (not self.station_ae or f.station.ae_title == self.station_ae))

    def identifier(self) -> Dataset:
        """The C-FIND identifier: these matching keys and the return keys a modality typically asks for."""
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.PatientName = ""
        ds.PatientID = ""
        ds.IssuerOfPatientID = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = ""
        ds.RequestingPhysician = ""
        ds.RequestedProcedureDescription = ""
        ds.RequestedProcedureCodeSequence = []
        ds.RequestedProcedureID = ""
        ds.RequestedProcedurePriority = ""
        ds.AdmissionID = ""
        ds.CurrentPatientLocation = ""
        step = Dataset()
        step.Modality = self.modality
        step.ScheduledStationAETitle = self.station_ae
        step.ScheduledProcedureStepStartDate = self.start_date
        step.ScheduledProcedureStepStartTime = ""
        step.ScheduledPerformingPhysicianName = ""
        step.ScheduledProcedureStepDescription = ""
        step.ScheduledProtocolCodeSequence = []
        step.ScheduledProcedureStepID = ""
        step.ScheduledStationName = ""
        step.ScheduledProcedureStepLocation = ""
        ds.ScheduledProcedureStepSequence = [step]
        return ds

    def keys_text(self) -> str:
        keys = [f"ScheduledStationAETitle={self.station_ae}"] if self.station_ae else []
        keys += [f"ScheduledProcedureStepStartDate={self.start_date}", f"Modality={self.modality}"]
        return ", ".join(keys)


def queries(today: date) -> list[QuerySpec]:
    """The typical station query and the broad one-week query, relative to ``today``."""
    day = today.strftime("%Y%m%d")
    week_end = (today + timedelta(days=WEEK_DAYS - 1)).strftime("%Y%m%d")
    return [
        QuerySpec("typical", "CT01", "CT01", day, "CT",
                  "a CT station asks for its own CT items of today"),
        QuerySpec("broad", "RF01", "", f"{day}-{week_end}", "RF",
                  "every RF item of the week from today (no station key)"),
    ]


def expected_counts(spread: Spread, specs: Sequence[QuerySpec]) -> dict[str, int]:
    """How many generated items each query matches (counted on the generated facts)."""
    counts = dict.fromkeys((s.name for s in specs), 0)
    with no_gc():
        for f in item_facts(spread):
            for spec in specs:
                if spec.matches(f):
                    counts[spec.name] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# bulk loading into the broker's database


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Cyclic garbage collection off: building millions of small dicts otherwise triggers it so often that
    it takes three quarters of the time (the items hold no reference cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _chunks(iterator: Iterator[ItemFacts], size: int) -> Iterator[list[ItemFacts]]:
    chunk: list[ItemFacts] = []
    for f in iterator:
        chunk.append(f)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class Rows:
    """The rows of one chunk, table by table, in foreign-key order."""

    patients: list[dict[str, Any]] = field(default_factory=list)
    orders: list[dict[str, Any]] = field(default_factory=list)
    procedures: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)


def rows_of(chunk: Sequence[ItemFacts], known_patients: set[int], now: datetime) -> Rows:
    """The rows the domain service would write for these orders (ids = item numbers, patient numbers)."""
    rows = Rows()
    for f in chunk:
        p = f.patient
        if p.number not in known_patients:
            known_patients.add(p.number)
            attributes = patient_attributes(p)
            rows.patients.append({"id": p.number, "patient_id": p.patient_id, "issuer": ISSUER,
                                  "patient_name": p.person.pn, "birth_date": p.birth_date, "sex": p.sex,
                                  "attributes": attributes, "merged_into_id": None, "created_at": now,
                                  "updated_at": now})
        rows.orders.append({"id": f.number, "patient_fk": p.number,
                            "sender": f"{SENDING_APPLICATION}^{SENDING_FACILITY}",
                            "placer_order_number": f.placer, "placer_issuer": SENDING_APPLICATION,
                            "filler_order_number": f.filler, "filler_issuer": FILLER_APPLICATION,
                            "order_control": "NW", "order_status": "SC", "created_at": now, "updated_at": now})
        rows.procedures.append({"id": f.number, "order_fk": f.number, "requested_procedure_id": f.rp_id,
                                "accession_number": f.accession, "study_instance_uid": f.study_uid,
                                "description": f.procedure[1], "created_at": now, "updated_at": now})
        item = stored_item(f)
        rows.steps.append({"id": f.number, "procedure_fk": f.number, "patient_fk": p.number, "item": item,
                           "created_at": now, "updated_at": now, **worklist_item.index_columns(item)})
        rows.transitions.append({"id": f.number, "step_fk": f.number, "at": now, "from_status": "",
                                 "to_status": STATUS, "cause": f"OMI^O23 B{f.number:09d}",
                                 "inbound_message_fk": None})
    return rows


TABLE_ORDER = ("patients", "orders", "requested_procedures", "scheduled_steps", "step_transitions")


def load_database(url: str, spread: Spread, *, chunk_size: int = 5000, method: str = "auto",
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Bulk-inserts the items of ``spread`` into the (migrated, empty) broker database at ``url``.

    ``method``: ``executemany`` (SQLAlchemy Core ``insert`` with a list of rows, one transaction per chunk),
    ``copy`` (PostgreSQL only: psycopg ``COPY ... FROM STDIN``), or ``auto`` (copy on PostgreSQL). Returns
    timings; afterwards PostgreSQL's id sequences are moved past the loaded ids.
    """
    from sqlalchemy import create_engine, event, insert, text

    from broker.store.tables import (
        Order,
        Patient,
        RequestedProcedure,
        ScheduledStep,
        StepTransition,
        table_of,
    )

    tables = dict(zip(TABLE_ORDER, (table_of(m) for m in (Patient, Order, RequestedProcedure, ScheduledStep,
                                                           StepTransition)), strict=True))
    engine = create_engine(url)
    backend = engine.url.get_backend_name()
    if method == "auto":
        method = "copy" if backend == "postgresql" else "executemany"
    if method == "copy" and backend != "postgresql":
        raise ValueError("COPY needs PostgreSQL")
    if backend == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # as the broker runs it
            cursor.execute("PRAGMA synchronous=OFF")  # a bench load: nothing to lose
            cursor.close()

    started = time.perf_counter()
    build_s = 0.0
    insert_s = 0.0
    known: set[int] = set()
    now = datetime.now().replace(microsecond=0)
    loaded = 0
    counts = dict.fromkeys(TABLE_ORDER, 0)
    try:
        with no_gc(), engine.connect() as conn:
            for chunk in _chunks(item_facts(spread), chunk_size):
                t0 = time.perf_counter()
                rows = rows_of(chunk, known, now)
                t1 = time.perf_counter()
                per_table = dict(zip(TABLE_ORDER, (rows.patients, rows.orders, rows.procedures, rows.steps,
                                                   rows.transitions), strict=True))
                if method == "copy":
                    _copy_chunk(conn, tables, per_table)
                else:
                    for name, table_rows in per_table.items():
                        if table_rows:
                            conn.execute(insert(tables[name]), table_rows)
                conn.commit()
                for name, table_rows in per_table.items():
                    counts[name] += len(table_rows)
                build_s += t1 - t0
                insert_s += time.perf_counter() - t1
                loaded += len(chunk)
                if progress:
                    progress(loaded)
            if backend == "postgresql":
                for name in TABLE_ORDER:
                    conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                                      f"(SELECT max(id) FROM {name}))"))
                conn.commit()
    finally:
        engine.dispose()
    return {"method": method, "chunk_size": chunk_size, "items": loaded, "rows": counts,
            "seconds": time.perf_counter() - started, "build_s": build_s, "insert_s": insert_s}


def _copy_chunk(conn: Any, tables: dict[str, Any], per_table: dict[str, list[dict[str, Any]]]) -> None:
    """COPY FROM STDIN of each table's rows, through the psycopg connection under SQLAlchemy's."""
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor:
        for name, rows in per_table.items():
            if not rows:
                continue
            columns = [c.name for c in tables[name].columns if c.name in rows[0]]  # others: their defaults
            json_columns = {c.name for c in tables[name].columns if c.type.__class__.__name__ == "JSON"}
            with cursor.copy(f"COPY {name} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([json.dumps(row[c]) if c in json_columns else row.get(c) for c in columns])


def analyze(url: str, *, vacuum: bool) -> float:
    """``VACUUM ANALYZE`` (PostgreSQL, ``vacuum``) or ``ANALYZE``; returns the seconds it took."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    try:
        with engine.connect() as conn:
            if engine.url.get_backend_name() == "postgresql" and vacuum:
                conn.execute(text("VACUUM (ANALYZE)"))
            else:
                conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# DICOM worklist files for the peers


def item_dataset(item: JsonDataset) -> Dataset:
    """The stored item as a pydicom dataset."""
    return Dataset.from_json(item)


def write_worklist_files(directory: Path, spread: Spread, progress: Callable[[int], None] | None = None) -> dict[
        str, Any]:
    """Writes every item as ``directory/<number>.wl`` (DICOM Part 10, Explicit VR Little Endian) and an
    empty ``lockfile`` (wlmscpfs wants one in each AE title directory). Returns counts and timings."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lockfile").touch()
    started = time.perf_counter()
    written = 0
    total_bytes = 0
    with no_gc():
        for f in item_facts(spread):
            written += _write_file(directory, f)
            if progress and written % 10_000 == 0:
                progress(written)
    total_bytes = sum(p.stat().st_size for p in directory.glob("*.wl"))
    return {"files": written, "bytes": total_bytes, "seconds": time.perf_counter() - started}


def _write_file(directory: Path, f: ItemFacts) -> int:
    ds = item_dataset(stored_item(f))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MWL_FIND_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = UID(f"{f.study_uid}.1")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(directory / f"{f.number:07d}.wl", enforce_file_format=True)
    return 1


# --------------------------------------------------------------------------------------------------
# command line


def _parse_day(text: str) -> date:
    return datetime.strptime(text, "%Y%m%d").date()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=10_000, help="number of items (default 10000)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"generator seed (default {SEED})")
    parser.add_argument("--today", type=_parse_day, default=date.today(),
                        help="the day the queries call today, YYYYMMDD (default: today)")
    parser.add_argument("--database", help="also load the items into this migrated, empty broker database URL")
    parser.add_argument("--method", choices=("auto", "executemany", "copy"), default="auto")
    parser.add_argument("--wl-dir", type=Path, help="also write the items as *.wl files into this directory")
    parser.add_argument("--show", type=int, default=0, help="print the first N items as HL7 and DICOM JSON")
    args = parser.parse_args(argv)
    spread = Spread(args.size, args.today, args.seed)
    specs = queries(spread.today)
    print(json.dumps(spread.describe(), indent=2))
    for spec, (name, count) in zip(specs, expected_counts(spread, specs).items(), strict=True):
        print(f"{name}: {spec.keys_text()} (calling AE {spec.calling_ae}) -> {count} items")
    started = time.perf_counter()
    checked = check_against_mapping(sample_for_check(spread))
    print(f"{checked} sample items equal the broker's mapping of their HL7 order "
          f"({time.perf_counter() - started:.1f} s)")
    for f in item_facts(spread):
        if f.number > args.show:
            break
        print(render_hl7(f).decode("latin-1").replace("\r", "\n"))
        print(json.dumps(stored_item(f), indent=1, ensure_ascii=False))
    if args.database:
        result = load_database(args.database, spread, method=args.method,
                               progress=lambda n: print(f"  loaded {n} items", flush=True)
                               if n % 100_000 == 0 else None)
        print(json.dumps(result, indent=2))
    if args.wl_dir:
        with contextlib.suppress(KeyboardInterrupt):
            print(json.dumps(write_worklist_files(args.wl_dir, spread), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
