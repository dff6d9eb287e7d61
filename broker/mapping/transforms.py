"""Value transforms from HL7 v2 data types to DICOM value representations.

Pure functions, no I/O. Inputs are already-unescaped ``str`` values (or the components of one field
repetition). A value that cannot be converted raises :class:`TransformError`; the mapping engine turns
that into an HL7 ERR 102 (data type error) naming the field, so the sender learns which value was bad
instead of the modality receiving a worklist item with a silently wrong attribute.
"""

from __future__ import annotations

import datetime
import re

from broker.hl7.message import escape

__all__ = [
    "MAX_LENGTH",
    "TransformError",
    "clean_cs",
    "code_item",
    "fn_to_family",
    "hl7_date_to_da",
    "hl7_ts_to_da_tm",
    "is_valid_uid",
    "map_value",
    "pick_code_triple",
    "pn_to_xpn",
    "sex_to_dicom",
    "truncate",
    "xcn_to_pn",
    "xpn_to_pn",
]


class TransformError(ValueError):
    """A value that cannot be converted; ``reason`` is short human text for the ERR segment."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- dates and times -------------------------------------------------------------------------------
# HL7 DT/DTM/TS: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]. Each part may only be present when the
# one before it is, which the nesting below enforces. [0-9] rather than \d: \d also matches non-ASCII
# digits, which are not valid in HL7 or DICOM dates.
_TS = re.compile(
    r"(?P<year>[0-9]{4})"
    r"(?:(?P<month>[0-9]{2})"
    r"(?:(?P<day>[0-9]{2})"
    r"(?:(?P<hour>[0-9]{2})"
    r"(?:(?P<minute>[0-9]{2})"
    r"(?:(?P<second>[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]+))?"
    r")?)?)?)?)?"
    r"(?P<zone>[+-][0-9]{4})?"
)
_TM_FRACTION_DIGITS = 6  # DICOM TM carries at most microseconds


def _parse_ts(value: str, what: str) -> tuple[str, str] | None:
    """Parse an HL7 date/timestamp into (DICOM DA, DICOM TM); None for empty. ``what`` names the type
    in error reasons.

    DICOM DA has no reduced precision, so a timestamp without month and day cannot become a DA and is
    refused rather than padded: "1970" padded to "19700101" would invent a birthday. The time zone is
    dropped. DA and TM are the matched digits themselves (each part is exactly two ASCII digits, or
    four for the year), so they are cut from the match instead of formatted from numbers.
    """
    text = value.strip()
    if not text:
        return None
    match = _TS.fullmatch(text)
    if match is None:
        raise TransformError(f"not an HL7 {what}: {value[:40]!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if day is None:
        raise TransformError(f"HL7 {what} without month and day, DICOM needs YYYYMMDD: {value[:40]!r}")
    try:
        datetime.date(int(year), int(month), int(day))
    except ValueError:
        raise TransformError(f"not a calendar date: {value[:40]!r}") from None
    if (hour is not None and int(hour) > 23) or (minute is not None and int(minute) > 59) or \
            (second is not None and int(second) > 59):
        raise TransformError(f"time out of range: {value[:40]!r}")
    if zone is not None and (int(zone[1:3]) > 23 or int(zone[3:5]) > 59):
        raise TransformError(f"time zone offset out of range: {value[:40]!r}")
    if hour is None:
        return year + month + day, ""
    tm = hour + (minute or "00") + (second or "00")
    if fraction:
        tm += "." + fraction[:_TM_FRACTION_DIGITS]
    return year + month + day, tm


def hl7_date_to_da(value: str) -> str:
    """HL7 DT/TS -> DICOM DA ``YYYYMMDD``; ``""`` for empty.

    Senders put full timestamps in date fields (PID-7 "197001011230"), so any valid TS is accepted and
    only its date is kept; the whole value is still checked so that garbage is reported, not truncated
    into something plausible. A time zone suffix is dropped.
    """
    parsed = _parse_ts(value, "date")
    return "" if parsed is None else parsed[0]


def hl7_ts_to_da_tm(value: str) -> tuple[str, str]:
    """HL7 TS -> (DICOM DA, DICOM TM); ``("", "")`` for empty, ``(DA, "")`` for a date-only value.

    TM is always ``HHMMSS`` (missing minutes/seconds padded with zeros, since many modalities mis-handle
    reduced-precision TM in matching), followed by ``.F`` ... ``.FFFFFF`` when the input had a fraction.
    The time zone offset is dropped: the worklist is in the local time the order was written in.
    """
    parsed = _parse_ts(value, "timestamp")
    return ("", "") if parsed is None else parsed


# --- person names ----------------------------------------------------------------------------------
_PN_GROUP_MAX = 64
# Characters that structure a DICOM PN value: component separator, component group separator, and the
# value multiplicity delimiter. Inside a component (after HL7 unescaping) they would change the
# structure of the name, so they become spaces.
_PN_STRUCTURE = str.maketrans({"^": " ", "=": " ", "\\": " "})


def _pn_component(text: str) -> str:
    return " ".join(text.translate(_PN_STRUCTURE).split())


def _truncate_pn_group(group: str) -> str:
    return group[:_PN_GROUP_MAX].rstrip("^")


def fn_to_family(subcomponents: list[str]) -> str:
    """HL7 v2.5 FN ``surname&own prefix&own surname&partner prefix&partner surname`` -> one family name.

    FN.1 is the whole surname as used ("VAN DEN BERG&VAN DEN&BERG"), the others its parts: FN.1 is
    taken when it holds every word of the other subcomponents. Otherwise (FN.1 empty, or a sender that
    cut one name into subcomponents, "VAN&DER&BERG") the non-empty subcomponents are joined with
    spaces ("VAN DER BERG"), so that no part of the name is dropped. Each subcomponent is text already
    (an escaped ``\\T\\`` is a literal ``&`` in it, kept).
    """
    parts = [" ".join(p.split()) for p in subcomponents]
    surname, rest = parts[0] if parts else "", [p for p in parts[1:] if p]
    words = {w.upper() for w in surname.replace("-", " ").split()}
    if surname and all(w.upper() in words for p in rest for w in p.replace("-", " ").split()):
        return surname
    return " ".join(p for p in parts if p)


def xpn_to_pn(components: list[str], family: list[str] | None = None) -> str:
    """HL7 XPN ``family^given^middle^suffix^prefix^degree`` -> DICOM PN ``family^given^middle^prefix^suffix``.

    HL7 and DICOM order prefix and suffix differently. DICOM has no degree component, so the degree is
    kept in the suffix ("JR MD"). The family name is a v2.5 FN whose subcomponents become one name by
    :func:`fn_to_family`: ``family`` gives them (split at the real separator, unescaped, so a literal
    ``&`` survives); without it ``components[0]`` is cut at ``&``. Trailing empty components are removed
    (DICOM encoders should not send "DOE^JANE^^^"), and the result is cut to the PN maximum of 64
    characters per component group without leaving a dangling "^".
    """
    first, given, middle, suffix, prefix, degree = (list(components[:6]) + [""] * 6)[:6]
    suffix = " ".join(p for p in (_pn_component(suffix), _pn_component(degree)) if p)
    surname = fn_to_family(family if family is not None else first.split("&"))
    parts = [_pn_component(surname), _pn_component(given), _pn_component(middle), _pn_component(prefix), suffix]
    return _truncate_pn_group("^".join(parts).rstrip("^"))


def xcn_to_pn(components: list[str], family: list[str] | None = None) -> str:
    """HL7 XCN ``ID^family^given^middle^suffix^prefix^degree^...`` -> DICOM PN (the ID is dropped).

    XCN components 2-7 are an XPN in the same order, so this is :func:`xpn_to_pn` on them (``family``:
    component 2's subcomponents).
    """
    return xpn_to_pn(components[1:7], family)


def pn_to_xpn(name: str) -> list[str]:
    """DICOM PN ``family^given^middle^prefix^suffix`` -> the HL7 XPN components ``family^given^middle^
    suffix^prefix`` (text, to be escaped by the writer: a ``&`` in a name is a character, never a
    subcomponent), trailing empty ones removed. Only the first (alphabetic) component group is used."""
    family, given, middle, prefix, suffix = [*name.split("=")[0].split("^"), "", "", "", "", ""][:5]
    parts = [family, given, middle, suffix, prefix]
    while parts and not parts[-1]:
        parts.pop()
    return parts


def xpn_field(name: str) -> str:
    """A DICOM PN as the HL7 XPN field the broker writes (PID-5 of its own messages): the components of
    :func:`pn_to_xpn`, each escaped, so ``SMITH&JONES`` goes out as ``SMITH\\T\\JONES``."""
    return "^".join(escape(part) for part in pn_to_xpn(name))


# --- coded values ----------------------------------------------------------------------------------
_SEX_PASS = {"M", "F", "O"}
_SEX_OTHER = {"A", "N"}  # HL7 table 0001 ambiguous / not applicable: DICOM has only "O" for these


def sex_to_dicom(value: str) -> str:
    """HL7 administrative sex (table 0001) -> DICOM Patient's Sex (M, F, O or empty).

    U (unknown) and anything unrecognised become empty: DICOM's empty value means "unknown", while
    "O" would assert something the sender did not say.
    """
    code = value.strip().upper()
    if code in _SEX_PASS:
        return code
    return "O" if code in _SEX_OTHER else ""


def map_value(value: str, table: dict[str, str], default: str | None = None) -> str:
    """Translate a coded value through a mapping-file value table (e.g. priority S -> STAT).

    An exact match wins; otherwise the match is case-insensitive, because senders disagree on case for
    the same code. Unknown values give ``default`` (or ``""``): an unrecognised priority must not stop
    an order.
    """
    key = value.strip()
    if key in table:
        return table[key]
    folded = {k.upper(): v for k, v in table.items()}
    if key.upper() in folded:
        return folded[key.upper()]
    return default if default is not None else ""


def clean_cs(value: str) -> str:
    """A DICOM CS value: upper case, ``A-Z 0-9 space _`` only, at most 16 characters.

    Lower case is fixed silently (it is harmless and common, "ct"); any other character is an error,
    because dropping it could turn one code into another.
    """
    code = value.strip().upper()
    if not re.fullmatch(r"[A-Z0-9 _]*", code):
        raise TransformError(f"not a DICOM code string (A-Z 0-9 space _): {value[:40]!r}")
    return code[:MAX_LENGTH["CS"]].rstrip()


def pick_code_triple(components: list[str]) -> tuple[str, str, str]:
    """(code, text, coding system) of an HL7 CE/CWE: components 1-3, or 4-6 (the alternate identifier).

    The alternate triple is used when component 1 is empty and component 4 is not: the OBR-4 convention
    "^^^CTABD^CT ABDOMEN^LOCAL". A field with no code in either place still returns components 1-3 so
    that a text-only value ("^CT ABDOMEN") keeps its text.
    """
    padded = [c.strip() for c in components[:6]] + [""] * 6
    if not padded[0] and padded[3]:
        return padded[3], padded[4], padded[5]
    return padded[0], padded[1], padded[2]


def code_item(code_value: str, meaning: str, scheme: str, default_scheme: str = "L") -> dict[str, str] | None:
    """A DICOM code sequence item ``{CodeValue, CodingSchemeDesignator, CodeMeaning}``; None without a code.

    Code Meaning is Type 1 in the code sequence macro, so an empty one is filled with the code value; an
    empty coding system gets ``default_scheme`` (DICOM "L", local). Values are truncated to their VRs
    (CodeValue SH 16, CodingSchemeDesignator SH 16, CodeMeaning LO 64).
    """
    code = code_value.strip()
    if not code:
        return None
    return {
        "CodeValue": truncate(code, "SH"),
        "CodingSchemeDesignator": truncate(scheme.strip() or default_scheme, "SH"),
        "CodeMeaning": truncate(meaning.strip() or code, "LO"),
    }


# --- lengths and identifiers -----------------------------------------------------------------------
# Maximum value lengths in characters by VR (PS3.5 table 6.2-1). PN is per component group.
# UC, UR and UT are unlimited (2^32-2) and are therefore absent, like any VR that is not a string.
MAX_LENGTH: dict[str, int] = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
    "PN": _PN_GROUP_MAX, "SH": 16, "ST": 1024, "TM": 14, "UI": 64,
}


def truncate(value: str, vr: str) -> str:
    """Cut a single value to the maximum length of its DICOM VR; unknown or unlimited VRs pass unchanged.

    HL7 fields are often longer than their DICOM counterparts (accession numbers, descriptions); a
    modality may refuse a whole worklist response over one over-long value, so it is cut here. PN is
    cut per component group ("=") and never left ending in "^".
    """
    vr = vr.upper()
    limit = MAX_LENGTH.get(vr)
    if limit is None:
        return value
    if vr == "PN":
        return "=".join(_truncate_pn_group(group) for group in value.split("="))
    return value[:limit]


_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_UID_MAX = 64


def is_valid_uid(value: str) -> bool:
    """DICOM UID syntax (PS3.5 9.1): 1-64 characters, dot-separated numbers without leading zeros.

    A UID that breaks these rules is refused by strict archives when the images arrive, long after the
    order; checking it at intake puts the error where it can still be fixed.
    """
    return 0 < len(value) <= _UID_MAX and _UID.fullmatch(value) is not None
