"""Reading a DICOM JSON request payload (PS3.18 F.2) into a pydicom dataset, or saying why not.

pydicom's ``Dataset.from_json`` is lenient: a keyword instead of a tag, a number in a CS element, a
17-character CS or a malformed date only warn, and the dataset then holds what the UPS service
would store. A UPS-RS request with such a payload is refused instead (400, with the element and the
reason), as the DIMSE edge refuses an attribute list it cannot decode: every key must be a tag of
eight hex digits, every element an object with a known ``vr``, values of the type F.2 gives that VR
and valid for it (pydicom's own validation, raising). Bulk data by reference is not taken: a UPS has
none, and the broker would have to fetch it.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydicom import Dataset, config
from pydicom.valuerep import validate_value

MEDIA_TYPE = "application/dicom+json"
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_NUMBER_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"})
_NUMBER_STRING_VRS = frozenset({"DS", "IS"})  # a JSON number (F.2.3), or its string form
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_PN_GROUPS = frozenset({"Alphabetic", "Ideographic", "Phonetic"})
_MAX_DEPTH = 16


class PayloadError(ValueError):
    """The payload is not what the transaction takes; the message says why (for the client)."""


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header field, without parameters, in lower case."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def read_dataset(body: bytes) -> Dataset:
    """The one dataset of a DICOM JSON payload: a JSON array holding one object (PS3.18 F.2), checked
    element by element. Raises :class:`PayloadError` naming what is wrong."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"the payload is not JSON: {exc}") from None
    if not isinstance(document, list) or len(document) != 1 or not isinstance(document[0], dict):
        raise PayloadError("the payload must be a DICOM JSON array holding one dataset (PS3.18 F.2)")
    check_dataset(document[0])
    try:
        return Dataset.from_json(document[0])
    except Exception as exc:  # anything pydicom still cannot take, whatever it raises
        raise PayloadError(f"the payload is not DICOM JSON: {type(exc).__name__}: {exc}") from None


def check_dataset(dataset: dict[str, Any], where: str = "", depth: int = 0) -> None:
    """Check one DICOM JSON object (and its sequence items); ``where`` names its place for the message."""
    if depth > _MAX_DEPTH:
        raise PayloadError(f"{where}: sequences nested deeper than {_MAX_DEPTH}")
    for key, element in dataset.items():
        place = f"{where}{key}"
        if not _TAG.fullmatch(key):
            raise PayloadError(f"{place}: a DICOM JSON key is a tag of eight hex digits (PS3.18 F.2.1)")
        if not isinstance(element, dict) or not isinstance(element.get("vr"), str):
            raise PayloadError(f"{place}: an element is an object with its \"vr\" (PS3.18 F.2.2)")
        _check_element(element, place, depth)


def _check_element(element: dict[str, Any], place: str, depth: int) -> None:
    vr = element["vr"]
    if "BulkDataURI" in element:
        raise PayloadError(f"{place}: BulkDataURI is not accepted; send the value (InlineBinary for binary VRs)")
    unknown = set(element) - {"vr", "Value", "InlineBinary"}
    if unknown:
        raise PayloadError(f"{place}: unknown member {sorted(unknown)[0]!r}")
    if "InlineBinary" in element:
        if vr not in _BINARY_VRS or not isinstance(element["InlineBinary"], str) or "Value" in element:
            raise PayloadError(f"{place}: InlineBinary is a base64 string, of a binary VR, without Value")
        return
    values = element.get("Value", [])
    if not isinstance(values, list):
        raise PayloadError(f"{place}: Value is an array (PS3.18 F.2.4)")
    if vr == "SQ":
        for number, item in enumerate(values):
            if not isinstance(item, dict):
                raise PayloadError(f"{place}: a sequence item is an object")
            check_dataset(item, f"{place}[{number}].", depth + 1)
        return
    for value in values:
        _check_value(vr, value, place)


def _check_value(vr: str, value: Any, place: str) -> None:
    if value is None:
        return  # an empty value in a multi-valued element (PS3.18 F.2.5)
    if vr in _TEXT_VRS or (vr in _NUMBER_STRING_VRS and isinstance(value, str)):
        if not isinstance(value, str):
            raise PayloadError(f"{place}: a {vr} value is a string")
        text = value
    elif vr in _NUMBER_STRING_VRS:
        if isinstance(value, bool) or not isinstance(value, int | float) or (vr == "IS" and value != int(value)):
            raise PayloadError(f"{place}: a {vr} value is a number")
        return
    elif vr in _NUMBER_VRS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"{place}: a {vr} value is a number")
        _validate(vr, value, place)
        return
    elif vr == "AT":
        if not isinstance(value, str) or not _TAG.fullmatch(value):
            raise PayloadError(f"{place}: an AT value is a tag of eight hex digits")
        return
    elif vr == "PN":
        if not isinstance(value, dict) or set(value) - _PN_GROUPS or \
                not all(isinstance(v, str) for v in value.values()):
            raise PayloadError(f"{place}: a PN value is an object of Alphabetic / Ideographic / Phonetic strings")
        text = "=".join(value.get(group, "") for group in ("Alphabetic", "Ideographic", "Phonetic")).rstrip("=")
    else:
        raise PayloadError(f"{place}: unknown VR {vr!r}" if vr not in _BINARY_VRS
                           else f"{place}: a {vr} element carries InlineBinary, not Value")
    _validate(vr, text, place)


def _validate(vr: str, value: Any, place: str) -> None:
    try:
        validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError, OverflowError) as exc:
        reason = str(exc).split(" Please see", 1)[0]
        raise PayloadError(f"{place}: {reason}") from None
