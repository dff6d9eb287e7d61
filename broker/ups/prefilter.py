"""The SQL pre-filter of a UPS C-FIND / UPS-RS Search: the indexed ``scheduled_steps`` columns that narrow it.

:meth:`broker.ups.service.UpsService.find` matches every key on the UPS view of a step
(:func:`broker.domain.ups_view.workitem`, :mod:`broker.domain.ups_matching`); this module only decides
which steps are worth building that view for. Its one rule: **the SQL selects a superset of the true
matches**. The Python match stays the final check on every row, so a condition here may be loose,
never tight.

Two kinds of keys:

- *fixed*: the view always takes them from the step itself, whatever a UPS SCU stored (SOP Instance UID,
  Procedure Step State, and the patient, :data:`broker.domain.ups_view._FROM_ITEM_ALWAYS`): a plain
  condition on the column;
- *overridable*: derived from the worklist item, but an N-CREATE / N-SET (DIMSE or UPS-RS) may have
  stored its own value in ``ups_workitems.attributes``, which the view shows instead (Study Instance UID,
  Worklist Label, SPS Start DateTime, the station, the request's Accession Number / Requested Procedure
  ID). A step passes when its columns match **or** its workitem's attributes hold that key at all.

The statement (:func:`candidate_ids`) is therefore a UNION: the steps whose columns match (each
alternative of Worklist Label and of the start its own SELECT, so each can use an index:
``ix_steps_station_start``, ``ix_steps_modality_start``, ``ix_steps_start``), and the steps whose
``ups_workitems`` row holds at least one of the overridable keys of the query, checked with "column
matches or the key is overridden" per key. A workitem row exists once UPS touched the step (N-CREATE,
N-SET, a claim, a cancel); HL7 steps that no UPS SCU changed have none, and a claim or cancel stores
none of these keys, so that branch reads the workitems (a cheap JSON key test each) but probes only the
few steps whose attributes override a key.

Multi-valued stored attributes: the columns hold the first value (``broker.domain.worklist_item``); the
keys used here are VM 1, so a stored item has one value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import product
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, literal_column, or_, select, union

from broker.dicom_json import JsonDataset, tag_of
from broker.domain import ups_matching as matching
from broker.domain.states import StepStatus
from broker.domain.ups_states import ups_state
from broker.store.tables import ScheduledStep, UpsWorkitem, table_of

__all__ = ["Overridable", "Prefilter", "build", "candidate_ids", "start_bounds"]

STEPS = table_of(ScheduledStep)
WORKITEMS = table_of(UpsWorkitem)

# The step statuses behind each UPS Procedure Step State (several statuses show as one state).
STATE_STEP_STATUSES: dict[str, list[str]] = {}
for _status in StepStatus:
    STATE_STEP_STATUSES.setdefault(str(ups_state(_status)), []).append(str(_status))

# A name with more trailing carets than this is matched by a range (a PN has at most 4 separators).
_CARETS = 4
# Keys whose alternatives each get their own SELECT (index-driving); others stay an OR inside each.
_SPLIT_LIMIT = 8


@dataclass(frozen=True)
class Overridable:
    """A key a workitem's own attributes may override: the step passes when one of ``alternatives``
    (column conditions) holds, or its ``ups_workitems.attributes`` has ``json_tag``.

    ``split``: give each alternative its own SELECT in the UNION (they use different indexes).
    """

    json_tag: str
    alternatives: tuple[ColumnElement[bool], ...]
    split: bool = False


@dataclass(frozen=True)
class Prefilter:
    """The conditions of one query; empty when no key narrows (every step is read)."""

    fixed: list[ColumnElement[bool]] = field(default_factory=list)
    overridable: list[Overridable] = field(default_factory=list)

    @property
    def narrows(self) -> bool:
        return bool(self.fixed or self.overridable)


def build(query: JsonDataset) -> Prefilter:
    """The pre-filter of a UPS identifier (DICOM JSON). Keys it cannot turn into a safe condition
    (wildcards, several values, unusual VRs) add nothing: the Python match decides them."""
    pre = Prefilter()
    uids = matching.uid_list(query, "SOPInstanceUID")
    if uids:
        pre.fixed.append(STEPS.c.ups_instance_uid.in_(uids))
    state = matching.single_text(query, "ProcedureStepState")
    if state is not None:
        pre.fixed.append(STEPS.c.sps_status.in_(STATE_STEP_STATUSES.get(state, [])))
    for keyword, column in (("PatientID", STEPS.c.patient_id), ("IssuerOfPatientID", STEPS.c.issuer_of_patient_id)):
        single = matching.single_text(query, keyword)
        if single is not None:
            pre.fixed.append(column == single)
    name = _patient_name(query)
    if name is not None:
        pre.fixed.append(name)
    study = matching.uid_list(query, "StudyInstanceUID")
    if study:
        pre.overridable.append(Overridable(tag_of("StudyInstanceUID"), (STEPS.c.study_instance_uid.in_(study),)))
    label = matching.single_text(query, "WorklistLabel")
    if label is not None:
        # Worklist Label is Scheduled Station AE Title, else Modality (ups_view.derived_attributes).
        pre.overridable.append(Overridable(tag_of("WorklistLabel"), (
            STEPS.c.scheduled_station_ae_title == label,
            and_(STEPS.c.scheduled_station_ae_title == "", STEPS.c.modality == label)), split=True))
    start = _start(query)
    if start is not None:
        pre.overridable.append(start)
    station = _station_name(query)
    if station is not None:
        pre.overridable.append(station)
    pre.overridable.extend(_request(query))
    return pre


def candidate_ids(pre: Prefilter, dialect_name: str) -> Select[Any]:
    """The ids of the steps that may match, in id order (a UNION, see the module docstring)."""
    base = [STEPS.c.ups_instance_uid.is_not(None), *pre.fixed]
    split = [o for o in pre.overridable if o.split and len(o.alternatives) > 1]
    rest = [o for o in pre.overridable if o not in split]
    while split and _combinations(split) > _SPLIT_LIMIT:
        rest.append(split.pop())
    together = [o.alternatives[0] if len(o.alternatives) == 1 else or_(*o.alternatives) for o in rest]
    selects = [select(STEPS.c.id).where(*base, *together, *choice)
               for choice in product(*(o.alternatives for o in split))]
    attributes = WORKITEMS.c.attributes
    overridden = [or_(*o.alternatives, _has_key(attributes, o.json_tag, dialect_name)) for o in pre.overridable]
    # Only workitems holding one of the keys at all: without any, the step passes on its columns alone,
    # as in the SELECTs above (a claim stores no such key). Driven by ups_workitems (the EXISTS keeps that
    # order on SQLite, whose planner scanned every step and probed ups_workitems when that table had no
    # statistics yet): one primary-key probe per such workitem.
    if pre.overridable:  # else the steps with a workitem pass on their columns, above
        holds_one = or_(*(_has_key(attributes, tag, dialect_name)
                          for tag in dict.fromkeys(o.json_tag for o in pre.overridable)))
        on_step = select(STEPS.c.id).where(STEPS.c.id == WORKITEMS.c.step_fk, *base, *overridden)
        selects.append(select(WORKITEMS.c.step_fk.label("id")).where(holds_one, on_step.exists()))
    ids = (union(*selects) if len(selects) > 1 else selects[0]).subquery()
    return select(ids.c.id).order_by(ids.c.id)


def _combinations(split: list[Overridable]) -> int:
    count = 1
    for o in split:
        count *= len(o.alternatives)
    return count


def _has_key(attributes: Any, json_tag: str, dialect_name: str) -> ColumnElement[bool]:
    """Whether the workitem's stored attributes hold ``json_tag`` (with or without a value)."""
    if dialect_name == "postgresql":
        present: ColumnElement[bool] = attributes.op("->")(literal_column(f"'{json_tag}'")).is_not(None)
        return present
    # json_type: NULL only when the path is absent (a JSON null is 'null').
    return func.json_type(attributes, f'$."{json_tag}"').is_not(None)


# --- Patient's Name ---------------------------------------------------------------------------------
def _patient_name(query: JsonDataset) -> ColumnElement[bool] | None:
    """Patient's Name (always the item's) on the indexed upper-cased copy ``patient_name_norm``.

    The UPS match is exact after trailing ``^`` (case-sensitive); comparing upper-cased values can only
    let more through, so this holds whatever the worklist's ``pn_case_insensitive`` option says. Stored
    names that differ from the key by trailing carets: listed up to four, and a range beyond.
    """
    single = matching.single_text(query, "PatientName")
    if single is None:
        return None
    base = single.rstrip("^").upper()  # as worklist_item.index_columns fills patient_name_norm
    if not base:
        return None
    norm = STEPS.c.patient_name_norm
    return or_(norm.in_([base + "^" * n for n in range(_CARETS + 1)]),
               and_(norm >= base + "^" * (_CARETS + 1), norm < base + "^" * _CARETS + "_"))


# --- Scheduled Procedure Step Start DateTime -------------------------------------------------------
_UNITS = (14, 12, 10, 8, 6, 4)  # YYYYMMDDHHMMSS down to YYYY


def _period(text: str) -> tuple[datetime, datetime] | None:
    """The period a DT prefix names, ``[start, end)``: its leading digits cut to the longest valid
    unit (second, minute, hour, day, month, year); ``None`` when not even a year is there."""
    digits = ""
    for char in text[:14]:
        if not ("0" <= char <= "9"):
            break
        digits += char
    for length in _UNITS:
        if len(digits) < length:
            continue
        parts = [int(digits[i:i + 2]) for i in range(4, length, 2)]
        month, day, hour, minute, second = (parts + [1, 1, 0, 0, 0][len(parts):])[:5]
        try:
            start = datetime(int(digits[:4]), month, day, hour, minute, second)
        except ValueError:  # month 13, day past the month's end, hour 24, second 60, year 0
            continue
        if length == 4:
            end = start.replace(year=start.year + 1) if start.year < 9999 else datetime.max
        elif length == 6:
            end = start.replace(year=start.year + 1, month=1) if month == 12 else start.replace(month=month + 1)
        else:
            end = start + {8: timedelta(days=1), 10: timedelta(hours=1), 12: timedelta(minutes=1),
                           14: timedelta(seconds=1)}[length]
        return start, end
    return None


def start_bounds(text: str) -> tuple[datetime | None, datetime | None]:
    """``scheduled_start`` bounds (low inclusive, high exclusive; ``None`` open) that every step whose
    UPS start DT matches ``text`` as :mod:`broker.domain.ups_matching` compares them lies within.

    That match compares strings: a range ``a-b`` holds when ``stored >= a`` and ``stored[:len(b)] <= b``;
    a single value when ``stored == value``. The stored DT is SPS Start Date + Time of the item, and
    ``scheduled_start`` is the same digits read as a datetime (time padded with zeros, fractions
    dropped), so a stored value at or after ``a`` starts no earlier than the period of ``a``'s first
    digits, and one at or before ``b`` (to its length) starts before the end of ``b``'s period. So
    ``20261205`` as a high bound is the whole day, ``20261205235959`` the end of that second, and a
    fraction or a UTC offset beyond the seconds only widens nothing.
    """
    if "-" in text:
        low_text, _, high_text = text.partition("-")
        low_text, high_text = low_text.strip(), high_text.strip()
    else:
        low_text = high_text = text
    low = _period(low_text) if low_text else None
    high = _period(high_text) if high_text else None
    return (low[0] if low else None), (high[1] if high else None)


def _start(query: JsonDataset) -> Overridable | None:
    """SPS Start DateTime as a range on ``scheduled_start`` (the same naive local datetimes and the same
    condition as the worklist's SPS Start Date/Time range, ``broker.mwl.matching``, which an application
    service may not import), or a step whose start date is there but could not be read as a datetime
    (its string may still match)."""
    key = query.get(tag_of("ScheduledProcedureStepStartDateTime"))
    if not key or key.get("vr") != "DT":
        return None
    single = matching.single_text(query, "ScheduledProcedureStepStartDateTime")
    if single is None:
        return None
    low, high = start_bounds(single)
    if high is not None and high == datetime.max:
        high = None
    column = STEPS.c.scheduled_start
    in_range = and_(column.is_not(None), *([column >= low] if low is not None else []),
                    *([column < high] if high is not None else []))
    unreadable = and_(STEPS.c.scheduled_start.is_(None), STEPS.c.sps_start_date != "")
    return Overridable(tag_of("ScheduledProcedureStepStartDateTime"), (in_range, unreadable), split=True)


# --- sequences ----------------------------------------------------------------------------------------
def _items(query: JsonDataset, keyword: str) -> list[JsonDataset]:
    key = query.get(tag_of(keyword))
    if not key or key.get("vr") != "SQ":
        return []
    return [i for i in key.get("Value") or [] if not matching.is_universal_item(i)]


def _station_name(query: JsonDataset) -> Overridable | None:
    """Scheduled Station Name Code Sequence > Code Value: the view's one item has the station name,
    else the station AE title, cut to 16 characters."""
    conditions = []
    for item in _items(query, "ScheduledStationNameCodeSequence"):
        code = matching.single_text(item, "CodeValue")
        if code is None or len(code) >= 16:  # 16: a longer stored name cut to it would match too
            continue
        conditions.append(or_(STEPS.c.scheduled_station_name == code,
                              and_(STEPS.c.scheduled_station_name == "", STEPS.c.scheduled_station_ae_title == code)))
    if not conditions:
        return None
    return Overridable(tag_of("ScheduledStationNameCodeSequence"), (and_(*conditions),))


def _request(query: JsonDataset) -> list[Overridable]:
    """Referenced Request Sequence > Accession Number / Requested Procedure ID (indexed columns): the
    view's one item is made of the item's own attributes."""
    found: list[Overridable] = []
    for item in _items(query, "ReferencedRequestSequence"):
        for keyword, column in (("AccessionNumber", STEPS.c.accession_number),
                                ("RequestedProcedureID", STEPS.c.requested_procedure_id)):
            single = matching.single_text(item, keyword)
            if single is not None:
                found.append(Overridable(tag_of("ReferencedRequestSequence"), (column == single,)))
    return found
