"""DICOM JSON (PS3.18 F.2) straight to Little Endian data set bytes (PS3.5 7.1), for responses.

Worklist items are stored as DICOM JSON. Going through pydicom (JSON -> Dataset -> ``write_dataset``)
cost about 0.9 ms per worklist response here, most of a typical query's CPU; this writes the bytes
directly for the value representations items hold. Anything else (AT, binary VRs, bulk data, ISO 2022
code extensions, a value too long for a short-length VR) raises :class:`NotDirectlyEncodable`, and the
caller goes through pydicom instead: same result, slower.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable
from functools import cache
from typing import Any

from pydicom.charset import python_encoding
from pydicom.valuerep import format_number_as_ds

from broker.dicom_json import JsonDataset, JsonElement

__all__ = ["NotDirectlyEncodable", "encode_json_data_set"]

_SPECIFIC_CHARACTER_SET = "00080005"
# Text whose bytes depend on the Specific Character Set (PS3.5 6.1.2.3)
_CHARSET_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_ASCII_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
_NUMBER_FORMATS = {"US": "<H", "SS": "<h", "UL": "<L", "SL": "<l", "FL": "<f", "FD": "<d", "SV": "<q", "UV": "<Q"}
# Explicit VR elements with a reserved field and a four-byte length (PS3.5 table 7.1-1)
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_DEFAULT_TERMS = frozenset({"", "ISO_IR 6"})


class NotDirectlyEncodable(Exception):
    """The data set holds something this encoder leaves to pydicom."""


def encode_json_data_set(dataset: JsonDataset, is_implicit_vr: bool) -> bytes:
    """The data set's bytes in Implicit or Explicit VR Little Endian; raises :class:`NotDirectlyEncodable`."""
    codec = _codec(_character_set(dataset.get(_SPECIFIC_CHARACTER_SET)))
    return _data_set(dataset, is_implicit_vr, codec)


def _character_set(elem: JsonElement | None) -> str:
    values = (elem or {}).get("Value") or []
    return "\\".join("" if v is None else str(v) for v in values)


@cache
def _codec(character_set: str) -> str:
    """The Python codec of a single-term Specific Character Set (ASCII for the default repertoire)."""
    terms = [t.strip() for t in character_set.split("\\")]
    if len(terms) > 1 or terms[0].startswith("ISO 2022"):
        raise NotDirectlyEncodable(f"code extensions ({character_set})")
    if terms[0] in _DEFAULT_TERMS:
        return "ascii"
    codec = python_encoding.get(terms[0])
    if codec is None:
        raise NotDirectlyEncodable(f"unknown character set {terms[0]!r}")
    return codecs.lookup(codec).name


def _data_set(dataset: JsonDataset, implicit: bool, codec: str) -> bytes:
    out = []
    for tag_text in sorted(dataset, key=_tag_number):
        elem = dataset[tag_text]
        vr = elem.get("vr", "")
        if len(elem) > 2 or ("Value" not in elem and len(elem) > 1):  # InlineBinary, BulkDataURI
            raise NotDirectlyEncodable(f"{tag_text}: bulk data")
        values = elem.get("Value")
        if not values:
            value = b""
        elif vr == "SQ":
            value = b"".join(_item(_data_set(item or {}, implicit, codec)) for item in values)
        else:
            value = _value(vr, values, codec, tag_text)
        prefix, long_length = _prefix(tag_text, vr, implicit)
        if long_length:
            out.append(prefix + _UL(len(value)))
        elif len(value) > 0xFFFF:
            raise NotDirectlyEncodable(f"{tag_text}: {len(value)} bytes in a {vr}")
        else:
            out.append(prefix + _US(len(value)))
        out.append(value)
    return b"".join(out)


_UL = struct.Struct("<L").pack
_US = struct.Struct("<H").pack


@cache
def _tag_number(tag_text: str) -> int:
    return int(tag_text, 16)


@cache
def _prefix(tag_text: str, vr: str, implicit: bool) -> tuple[bytes, bool]:
    """An element's header up to its length field, and whether that field is four bytes long."""
    tag = int(tag_text, 16)
    group_element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return group_element, True
    if vr in _LONG_LENGTH_VRS:
        return group_element + vr.encode() + b"\x00\x00", True
    return group_element + vr.encode(), False


def _item(content: bytes) -> bytes:
    return _ITEM + _UL(len(content)) + content


def _value(vr: str, values: list[Any], codec: str, tag_text: str) -> bytes:
    number_format = _NUMBER_FORMATS.get(vr)
    if number_format is not None:
        return b"".join(struct.pack(number_format, v) for v in values if v is not None)
    text_of = _TEXT_OF.get(vr)
    if text_of is None:
        raise NotDirectlyEncodable(f"{tag_text}: VR {vr}")
    text = text_of(values[0]) if len(values) == 1 else "\\".join(text_of(v) for v in values)
    try:
        data = text.encode(codec if vr in _CHARSET_TEXT_VRS else "ascii")
    except UnicodeEncodeError as exc:
        raise NotDirectlyEncodable(f"{tag_text}: not encodable in {codec}") from exc
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def _plain(value: Any) -> str:
    return "" if value is None else str(value)


def _person_name(value: Any) -> str:
    if not isinstance(value, dict):
        return _plain(value)
    groups = [value.get("Alphabetic") or "", value.get("Ideographic") or "", value.get("Phonetic") or ""]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _decimal_string(value: Any) -> str:
    if isinstance(value, float):
        return format_number_as_ds(value)
    return _plain(value)


_TEXT_OF: dict[str, Callable[[Any], str]] = {
    **dict.fromkeys(_ASCII_TEXT_VRS | _CHARSET_TEXT_VRS - {"PN"}, _plain),
    "PN": _person_name, "IS": _plain, "DS": _decimal_string,
}
