"""Read a Modality Worklist C-FIND identifier into a :class:`WorklistQuery` (PS3.4 K.6.1, C.2.2.2).

The query is plain data, decided once here, so that the SQL (:mod:`broker.mwl.matching`) and the
responses (:mod:`broker.mwl.responses`) never look at the identifier again:

- **match conditions**, one per non-universal key the broker can match on (:data:`TOP_LEVEL_KEYS`,
  :data:`SPS_KEYS`): single value, wildcard, UID list, DA range, and SPS Start Date/Time as one range;
- **return keys**: the tree of requested attributes, top level and inside sequences, in tag order;
- **unsupported keys**: non-empty keys the broker cannot match on. They are ignored for matching and
  still returned; their presence makes the edge answer FF01 instead of FF00 (PS3.4 C.4.1.1.4);
- the identifier's **Specific Character Set** (its text values arrive decoded by pydicom with it).

Errors raise :class:`IdentifierError` carrying the status the edge answers with:

- ``A900`` *Identifier does not match SOP Class*: the identifier's structure is not a worklist
  identifier: a sequence with more than one item (SPS Sequence or any other), an attribute that must be
  a sequence sent as a value or the reverse, an identifier pydicom cannot decode;
- ``C000`` *Unable to process*: the structure is right but a value cannot be used: a malformed or
  reversed range, an invalid date or time, a wildcard where the VR allows none (DA, TM, UI), several
  values in a key that takes one, an unknown Specific Character Set, text not valid in it.

Leniencies, all documented: a value of only ``*`` is universal for every VR (modalities send it for
dates too); trailing ``^`` in a PN are insignificant; a PN key with several component groups
(``alphabetic=ideographic=phonetic``) matches an item whose stored name matches any one of them (the
broker stores one group); a time-only range whose end is before its start crosses midnight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

__all__ = [
    "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS",
    "SPS_KEYS",
    "TOP_LEVEL_KEYS",
    "UNABLE_TO_PROCESS",
    "AnyOf",
    "Condition",
    "DateRange",
    "IdentifierError",
    "MatchingKey",
    "ReturnKey",
    "SingleValue",
    "StartRange",
    "TimeOfDayRange",
    "UidList",
    "Wildcard",
    "WorklistQuery",
    "parse_identifier",
]

IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
_ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO


class IdentifierError(ValueError):
    """The identifier cannot be answered; the edge replies ``status`` with ``comment`` as Error Comment.

    ``comment`` is ASCII and at most 64 characters (the command set has no character set, and Error
    Comment is LO). ``offending`` holds the tags of the attributes at fault, for Offending Element
    (0000,0901).
    """

    def __init__(self, comment: str, status: int = UNABLE_TO_PROCESS, offending: Iterable[int] = ()) -> None:
        self.comment = comment.encode("ascii", "replace").decode("ascii")[:_ERROR_COMMENT_MAX]
        self.status = status
        self.offending = tuple(offending)
        super().__init__(self.comment)


# --- what the broker can match on ------------------------------------------------------------------
@dataclass(frozen=True)
class MatchingKey:
    """A key the broker matches in SQL: its column in ``scheduled_steps`` (and the upper-cased copy for PN)."""

    keyword: str
    column: str
    vr: str
    norm_column: str | None = None


def _keys(*keys: MatchingKey) -> Mapping[str, MatchingKey]:
    return {key.keyword: key for key in keys}


# Every column worklist_item.index_columns fills has a key here; anything else is "unsupported".
TOP_LEVEL_KEYS: Mapping[str, MatchingKey] = _keys(
    MatchingKey("PatientName", "patient_name", "PN", "patient_name_norm"),
    MatchingKey("PatientID", "patient_id", "LO"),
    MatchingKey("IssuerOfPatientID", "issuer_of_patient_id", "LO"),
    MatchingKey("PatientBirthDate", "patient_birth_date", "DA"),
    MatchingKey("PatientSex", "patient_sex", "CS"),
    MatchingKey("AccessionNumber", "accession_number", "SH"),
    MatchingKey("RequestedProcedureID", "requested_procedure_id", "SH"),
    MatchingKey("StudyInstanceUID", "study_instance_uid", "UI"),
    # No upper-cased copies of these two: they match case-sensitively whatever the PN option says.
    MatchingKey("ReferringPhysicianName", "referring_physician", "PN"),
    MatchingKey("RequestingPhysician", "requesting_physician", "PN"),
    MatchingKey("AdmissionID", "admission_id", "LO"),
    MatchingKey("PlacerOrderNumberImagingServiceRequest", "placer_order_number", "LO"),
    MatchingKey("FillerOrderNumberImagingServiceRequest", "filler_order_number", "LO"),
)
SPS_KEYS: Mapping[str, MatchingKey] = _keys(
    MatchingKey("ScheduledStationAETitle", "scheduled_station_ae_title", "AE"),
    MatchingKey("Modality", "modality", "CS"),
    MatchingKey("ScheduledPerformingPhysicianName", "performing_physician", "PN", "performing_physician_norm"),
    MatchingKey("ScheduledProcedureStepID", "sps_id", "SH"),
    MatchingKey("ScheduledProcedureStepStatus", "sps_status", "CS"),
    MatchingKey("ScheduledStationName", "scheduled_station_name", "SH"),
    MatchingKey("ScheduledProcedureStepLocation", "sps_location", "SH"),
)


# --- match conditions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SingleValue:
    """Exact match (PN: case-insensitive when the option is on and the key has an upper-cased column)."""

    key: MatchingKey
    value: str


@dataclass(frozen=True)
class Wildcard:
    """``*`` any run of characters (also none), ``?`` exactly one; every other character is literal."""

    key: MatchingKey
    pattern: str


@dataclass(frozen=True)
class AnyOf:
    """Matches when one of the alternatives does (a PN key with several component groups)."""

    key: MatchingKey
    alternatives: tuple[SingleValue | Wildcard, ...]


@dataclass(frozen=True)
class UidList:
    """List of UID matching: the stored UID is one of these."""

    key: MatchingKey
    uids: tuple[str, ...]


@dataclass(frozen=True)
class DateRange:
    """Inclusive DA range on a ``YYYYMMDD`` string column; ``None`` = open end. Never matches ''."""

    key: MatchingKey
    low: str | None
    high: str | None


@dataclass(frozen=True)
class StartRange:
    """SPS Start Date (with Time when both are given) as one range on ``scheduled_start``.

    ``low`` inclusive, ``high`` exclusive (the end of the last date, or of the last time at the
    precision it was written in); ``None`` = open end. Items without a start date never match.
    """

    low: datetime | None
    high: datetime | None


@dataclass(frozen=True)
class TimeOfDayRange:
    """SPS Start Time alone: ``HHMMSS`` bounds, both inclusive, on ``sps_start_time``.

    ``low > high`` is a range across midnight (from ``low`` to the end of the day, and from midnight to
    ``high``). Items without a start time never match.
    """

    low: str | None
    high: str | None

    @property
    def crosses_midnight(self) -> bool:
        return self.low is not None and self.high is not None and self.low > self.high


Condition = SingleValue | Wildcard | AnyOf | UidList | DateRange | StartRange | TimeOfDayRange


# --- return keys and the query ---------------------------------------------------------------------
@dataclass(frozen=True)
class ReturnKey:
    """A requested attribute. For a sequence, ``items`` are the keys asked for inside each item;
    ``None`` (a zero-length sequence or an empty item in the identifier) asks for the whole sequence."""

    tag: int
    keyword: str
    vr: str
    items: tuple[ReturnKey, ...] | None = None

    @property
    def json_tag(self) -> str:
        """The DICOM JSON key of the attribute ("00100010")."""
        return f"{self.tag:08X}"


@dataclass(frozen=True)
class WorklistQuery:
    """Everything a worklist C-FIND asks for, decided once from the identifier."""

    conditions: tuple[Condition, ...] = ()
    return_keys: tuple[ReturnKey, ...] = ()
    # Paths ("Seq>Keyword") of non-empty keys ignored for matching: the edge answers FF01 when any.
    unsupported_keys: tuple[str, ...] = ()
    # The identifier's Specific Character Set, one term per value ("" for the default repertoire).
    character_set: tuple[str, ...] = ()

    @property
    def optional_keys_unsupported(self) -> bool:
        """Whether pending responses carry FF01 (optional keys not supported) rather than FF00."""
        return bool(self.unsupported_keys)

    def matches_on(self, keyword: str) -> bool:
        """Whether the query has a (non-universal) condition on ``keyword``."""
        return any(isinstance(c, (SingleValue, Wildcard, AnyOf, UidList, DateRange)) and c.key.keyword == keyword
                   for c in self.conditions)


# --- parsing ---------------------------------------------------------------------------------------
SPS_SEQUENCE = Tag("ScheduledProcedureStepSequence")
_SPECIFIC_CHARACTER_SET = Tag("SpecificCharacterSet")
_SPS_START_DATE = Tag("ScheduledProcedureStepStartDate")
_SPS_START_TIME = Tag("ScheduledProcedureStepStartTime")
# Not attributes of a worklist item: some SCUs send Query/Retrieve Level anyway; it is ignored.
_IGNORED = frozenset({Tag("QueryRetrieveLevel")})
_DA = re.compile(r"\d{8}")
_TM = re.compile(r"(\d\d)(?:(\d\d)(?:(\d\d)(?:\.\d{1,6})?)?)?")
_UID = re.compile(r"[0-9.]{1,64}")
_DAY = timedelta(days=1)


def parse_identifier(identifier: Dataset) -> WorklistQuery:
    """The :class:`WorklistQuery` of a C-FIND identifier; raises :class:`IdentifierError` when invalid.

    Text values are read through pydicom, which decodes them with the identifier's Specific Character
    Set (sequence items inherit it); that set is checked first, so a query in an unknown one is
    refused rather than matched with mis-decoded names.
    """
    return _Parser(identifier).query()


class _Parser:
    """One identifier's walk; collects conditions, unsupported keys and the SPS date/time pair."""

    def __init__(self, identifier: Dataset) -> None:
        self.identifier = identifier
        self.conditions: list[Condition] = []
        self.unsupported: list[str] = []

    def query(self) -> WorklistQuery:
        character_set = self._character_set()
        return_keys = self._walk(self.identifier, TOP_LEVEL_KEYS, "")
        return WorklistQuery(tuple(self.conditions), return_keys, tuple(self.unsupported), character_set)

    def _character_set(self) -> tuple[str, ...]:
        elem = self.identifier.get(_SPECIFIC_CHARACTER_SET)
        if elem is None or elem.is_empty:
            return ()
        terms = tuple((str(v or "")).strip() for v in _values(elem))
        unknown = [t for t in terms if t not in python_encoding]
        if unknown:
            raise IdentifierError(f"Specific Character Set {unknown[0]!r} not supported",
                                  offending=[_SPECIFIC_CHARACTER_SET])
        return terms

    def _walk(self, dataset: Dataset, keys: Mapping[str, MatchingKey], path: str,
              sps: bool = False) -> tuple[ReturnKey, ...]:
        """Return keys of one dataset level; conditions for the keys of ``keys``."""
        return_keys: list[ReturnKey] = []
        dates: dict[int, DataElement] = {}
        for elem in _elements(dataset):
            tag = elem.tag
            keyword = keyword_for_tag(tag)
            if tag == _SPECIFIC_CHARACTER_SET or tag in _IGNORED or tag.element == 0 or tag.group in (0, 2):
                continue
            if tag.is_private or not keyword:
                # Private or unknown: never returned (we hold no value and cannot vouch for a VR).
                if not elem.is_empty:
                    self.unsupported.append(path + (keyword or str(tag)))
                continue
            _check_sequence_vr(elem, keyword)
            if elem.VR == "SQ":
                return_keys.append(self._sequence(elem, keyword, path, is_sps=not path and tag == SPS_SEQUENCE))
                continue
            return_keys.append(ReturnKey(int(tag), keyword, _return_vr(elem)))
            if sps and tag in (_SPS_START_DATE, _SPS_START_TIME):
                dates[tag] = elem
            elif not elem.is_empty:
                key = keys.get(keyword)
                if key is None:
                    self.unsupported.append(path + keyword)
                else:
                    condition = _condition(key, elem)
                    if condition is not None:
                        self.conditions.append(condition)
        if sps:
            condition = _start_condition(dates.get(_SPS_START_DATE), dates.get(_SPS_START_TIME))
            if condition is not None:
                self.conditions.append(condition)
        return tuple(return_keys)

    def _sequence(self, elem: DataElement, keyword: str, path: str, is_sps: bool) -> ReturnKey:
        items = list(elem.value or [])
        if len(items) > 1:
            raise IdentifierError(f"{keyword} must hold one item, not {len(items)}",
                                  IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, [elem.tag])
        sub_keys: tuple[ReturnKey, ...] = ()
        if items:
            # The SPS item's keys are matched against the one stored SPS item; keys inside any other
            # sequence are return keys only (a value there is an unsupported matching key).
            sub_keys = self._walk(items[0], SPS_KEYS if is_sps else {}, f"{path}{keyword}>", sps=is_sps)
        return ReturnKey(int(elem.tag), keyword, "SQ", sub_keys or None)


def _elements(dataset: Dataset) -> list[DataElement]:
    """The dataset's elements, decoded; anything pydicom cannot decode is an A900."""
    try:
        return list(dataset)
    except Exception as exc:  # pydicom raises many types on malformed bytes; all mean the same here
        raise IdentifierError(f"identifier cannot be decoded ({type(exc).__name__})",
                              IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) from exc


def _check_sequence_vr(elem: DataElement, keyword: str) -> None:
    expected_sq = dictionary_VR(elem.tag) == "SQ"
    if expected_sq != (elem.VR == "SQ"):
        raise IdentifierError(f"{keyword} has VR {elem.VR}, expected {dictionary_VR(elem.tag)}",
                              IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, [elem.tag])


def _return_vr(elem: DataElement) -> str:
    """The VR to answer an empty attribute with (the first choice of an ambiguous one, as 'US or SS')."""
    return str(elem.VR).split(" or ")[0]


def _values(elem: DataElement) -> list[object]:
    if elem.is_empty:
        return []
    if elem.VM == 1:  # a PersonName or str is iterable too: it is still one value
        return [elem.value]
    return list(elem.value)


def _text(elem: DataElement, keyword: str) -> str:
    """The single text value of a matching key (spaces around it are padding, not content)."""
    values = _values(elem)
    if len(values) != 1:
        raise IdentifierError(f"{keyword}: one value expected, not {len(values)}", offending=[elem.tag])
    raw = values[0]
    text = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)).strip(" \0")
    if "\ufffd" in text:
        raise IdentifierError(f"{keyword} is not valid in its Specific Character Set", offending=[elem.tag])
    return text


def _all_stars(text: str) -> bool:
    return bool(text) and not text.strip("*")


def _condition(key: MatchingKey, elem: DataElement) -> Condition | None:
    """The condition of one non-empty key; ``None`` when the value is universal after all (``*``)."""
    if key.vr == "UI":
        return _uid_condition(key, elem)
    text = _text(elem, key.keyword)
    if not text or _all_stars(text):
        return None
    if key.vr == "DA":
        return _date_condition(key, text, elem.tag)
    if key.vr == "PN":
        return _pn_condition(key, text)
    return _text_condition(key, text)


def _text_condition(key: MatchingKey, text: str) -> SingleValue | Wildcard:
    if "*" in text or "?" in text:
        return Wildcard(key, text)
    return SingleValue(key, text)


def _pn_condition(key: MatchingKey, text: str) -> Condition | None:
    groups = [g.rstrip("^ ") for g in text.split("=")]
    groups = [g for g in groups if g]
    if not groups or any(_all_stars(g) for g in groups):
        return None
    alternatives = tuple(dict.fromkeys(_text_condition(key, g) for g in groups))
    return alternatives[0] if len(alternatives) == 1 else AnyOf(key, alternatives)


def _uid_condition(key: MatchingKey, elem: DataElement) -> Condition | None:
    uids = [str(v).strip(" \0") for v in _values(elem)]
    uids = [u for u in uids if u]
    if not uids or any(_all_stars(u) for u in uids):
        return None
    for uid in uids:
        if not _UID.fullmatch(uid):
            raise IdentifierError(f"{key.keyword}: not a UID {uid[:20]!r}", offending=[elem.tag])
    return SingleValue(key, uids[0]) if len(uids) == 1 else UidList(key, tuple(dict.fromkeys(uids)))


def _split_range(text: str, keyword: str, tag: int) -> tuple[str, str] | None:
    """``(low, high)`` of a range value (either may be ''), ``None`` for a single value."""
    if "-" not in text:
        return None
    low, _, high = text.partition("-")
    if "-" in high or not (low or high):
        raise IdentifierError(f"{keyword}: malformed range {text[:24]!r}", offending=[tag])
    return low.strip(), high.strip()


def _parse_da(text: str, keyword: str, tag: int) -> date:
    if not _DA.fullmatch(text):
        raise IdentifierError(f"{keyword}: not a date {text[:20]!r}", offending=[tag])
    try:
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise IdentifierError(f"{keyword}: not a date {text[:20]!r}", offending=[tag]) from None


def _parse_tm(text: str, keyword: str, tag: int) -> tuple[timedelta, timedelta]:
    """``(start, precision)`` of a TM: "09" is the hour from 09:00, "0930" the minute from 09:30.

    Fractions are dropped: stored start times are compared to the second.
    """
    match = _TM.fullmatch(text)
    if not match:
        raise IdentifierError(f"{keyword}: not a time {text[:20]!r}", offending=[tag])
    hour, minute, second = int(match[1]), int(match[2] or 0), int(match[3] or 0)
    if hour > 23 or minute > 59 or second > 60:
        raise IdentifierError(f"{keyword}: not a time {text[:20]!r}", offending=[tag])
    precision = (timedelta(hours=1) if match[2] is None else timedelta(minutes=1) if match[3] is None
                 else timedelta(seconds=1))
    return timedelta(hours=hour, minutes=minute, seconds=min(second, 59)), precision


def _no_wildcards(text: str, keyword: str, tag: int) -> None:
    if "*" in text or "?" in text:
        raise IdentifierError(f"{keyword}: no wildcards in a date or time", offending=[tag])


def _date_condition(key: MatchingKey, text: str, tag: int) -> Condition:
    _no_wildcards(text, key.keyword, tag)
    bounds = _split_range(text, key.keyword, tag)
    if bounds is None:
        _parse_da(text, key.keyword, tag)
        return SingleValue(key, text)
    low, high = bounds
    if low:
        _parse_da(low, key.keyword, tag)
    if high:
        _parse_da(high, key.keyword, tag)
    if low and high and low > high:
        raise IdentifierError(f"{key.keyword}: range ends before it starts", offending=[tag])
    return DateRange(key, low or None, high or None)


_DateBounds = tuple[date | None, date | None]
_TimeBounds = tuple[timedelta | None, timedelta | None]  # start, exclusive end (as times of day)


def _range_key(elem: DataElement | None, keyword: str) -> tuple[str, tuple[str, str] | None, int] | None:
    """A date or time matching key read for range matching: its text, its ``(low, high)`` when it is a
    range (``None`` for a single value) and its tag; ``None`` when the key is universal (absent, empty
    or only ``*``). Wildcards in it are refused (IdentifierError), as for every date and time key."""
    if elem is None or elem.is_empty:
        return None
    tag = int(elem.tag)
    text = _text(elem, keyword)
    if not text or _all_stars(text):
        return None
    _no_wildcards(text, keyword, tag)
    return text, _split_range(text, keyword, tag), tag


def _date_bounds(elem: DataElement | None) -> _DateBounds | None:
    """Inclusive first and last day of an SPS Start Date key; ``None`` when universal."""
    keyword = "ScheduledProcedureStepStartDate"
    key = _range_key(elem, keyword)
    if key is None:
        return None
    text, bounds, tag = key
    if bounds is None:
        day = _parse_da(text, keyword, tag)
        return day, day
    low = _parse_da(bounds[0], keyword, tag) if bounds[0] else None
    high = _parse_da(bounds[1], keyword, tag) if bounds[1] else None
    if low and high and low > high:
        raise IdentifierError(f"{keyword}: range ends before it starts", offending=[tag])
    return low, high


def _time_bounds(elem: DataElement | None) -> _TimeBounds | None:
    """Start and exclusive end of an SPS Start Time key as times of day; ``None`` when universal."""
    keyword = "ScheduledProcedureStepStartTime"
    key = _range_key(elem, keyword)
    if key is None:
        return None
    text, bounds, tag = key
    if bounds is None:
        start, precision = _parse_tm(text, keyword, tag)
        return start, start + precision
    low = _parse_tm(bounds[0], keyword, tag)[0] if bounds[0] else None
    high = sum(_parse_tm(bounds[1], keyword, tag), timedelta()) if bounds[1] else None
    return low, high


def _at(day: date, offset: timedelta) -> datetime:
    return datetime.combine(day, time()) + offset


def _hhmmss(offset: timedelta) -> str:
    seconds = int(offset.total_seconds())
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _start_condition(date_elem: DataElement | None, time_elem: DataElement | None) -> Condition | None:
    """SPS Start Date and Time: one date-time range when both are given (PS3.4 C.2.2.2.5.1).

    Date 20261122-20261123 with time 0800-1700 is 2026-11-22 08:00 up to 2026-11-23 17:00 (17:00:59,
    the end of the minute written); a date alone is whole days; a time alone is a time-of-day range.
    """
    days = _date_bounds(date_elem)
    times = _time_bounds(time_elem)
    if days is None and times is None:
        return None
    if days is None:
        assert times is not None
        low, high = times
        # Inclusive HHMMSS bounds: the last second before the exclusive end.
        return TimeOfDayRange(_hhmmss(low) if low is not None else None,
                              _hhmmss(high - timedelta(seconds=1)) if high is not None else None)
    first, last = days
    time_low, time_high = times if times is not None else (None, None)
    start = _at(first, time_low or timedelta()) if first else None
    end = _at(last, time_high if time_high is not None else _DAY) if last else None
    if start and end and start >= end:
        tag = time_elem.tag if time_elem is not None else _SPS_START_TIME
        raise IdentifierError("SPS start date/time range ends before it starts", offending=[int(tag)])
    return StartRange(start, end)
