"""DICOM JSON (PS3.18 F.2) helpers: build and read elements by keyword.

Worklist items are stored in this form; both the mapping (which builds them) and the domain (which
updates them) use these few functions so there is one way to write an element.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

# A DICOM JSON element, e.g. {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}.
JsonElement = dict[str, Any]
# A DICOM JSON dataset: tag ("00100010") -> element.
JsonDataset = dict[str, JsonElement]


@cache
def tag_of(keyword: str) -> str:
    """DICOM JSON tag key ("00100010") of a keyword."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"not a DICOM keyword: {keyword}")
    return f"{tag:08X}"


@cache
def vr_of(keyword: str) -> str:
    """The VR of a keyword from the DICOM data dictionary."""
    return str(dictionary_VR(keyword))


def element(keyword: str, value: Any) -> JsonElement:
    """A DICOM JSON element; ``None``, '' or [] gives an element without Value (an empty attribute)."""
    return vr_element(vr_of(keyword), value)


def vr_element(vr: str, value: Any) -> JsonElement:
    """:func:`element` for a keyword whose VR is known already (the mapping's compiled rules)."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    if vr == "SQ":
        return {"vr": vr, "Value": value}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    if vr == "CS" and isinstance(value, str) and "\\" in value:
        # Multi-valued (e.g. Specific Character Set "\\ISO 2022 IR 87"); an empty value is null in JSON.
        return {"vr": vr, "Value": [v or None for v in value.split("\\")]}
    return {"vr": vr, "Value": [value]}


def element_value(elem: JsonElement | None) -> Any:
    """The value of a DICOM JSON element: the first one (PN: its alphabetic group), a multi-valued CS
    joined by backslashes as DICOM writes it, or '' when empty."""
    if not elem:
        return ""
    values = elem.get("Value")
    if not values:
        return ""
    first = values[0]
    if isinstance(first, dict) and elem.get("vr") == "PN":
        return first.get("Alphabetic", "")
    if len(values) > 1 and elem.get("vr") == "CS":
        return "\\".join(v or "" for v in values)
    return "" if first is None else first


def value(dataset: JsonDataset, keyword: str) -> str:
    """First value of ``keyword`` in ``dataset`` as a string ('' when absent or empty)."""
    return str(element_value(dataset.get(tag_of(keyword))))


def has_value(dataset: JsonDataset, keyword: str) -> bool:
    """Whether ``keyword`` is present with a value (a sequence: with at least one item)."""
    elem = dataset.get(tag_of(keyword))
    if not elem or not elem.get("Value"):
        return False
    return elem.get("vr") == "SQ" or any(v not in (None, "") for v in elem["Value"])


def sequence_items(dataset: JsonDataset, keyword: str) -> list[JsonDataset]:
    """The items of a sequence attribute ([] when absent or empty)."""
    elem = dataset.get(tag_of(keyword))
    if not elem or elem.get("vr") != "SQ":
        return []
    return list(elem.get("Value") or [])
