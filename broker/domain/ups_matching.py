"""Attribute matching of a UPS C-FIND identifier (or a filtered global subscription's matching keys)
against a UPS workitem, both DICOM JSON (PS3.4 C.2.2.2).

Single value (exact, case-sensitive), wildcard ``*`` / ``?`` for the text VRs, UID list, range
(``a-b``, ``-b``, ``a-``) for DA / TM / DT, universal (empty) and sequence matching (the keys of the
query item must all match one stored item). A stored empty value matches only a universal key.
A value of ``*`` alone is universal. Return keys: :func:`selected` keeps what the identifier asks for.
"""

from __future__ import annotations

import re
from functools import lru_cache

from broker.dicom_json import JsonDataset, JsonElement, tag_of

_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_SPECIFIC_CHARACTER_SET = tag_of("SpecificCharacterSet")


class UnsupportedKey(ValueError):
    """A key whose value cannot be used for matching (e.g. several values where one is allowed)."""


def _texts(elem: JsonElement | None) -> list[str]:
    if not elem:
        return []
    out: list[str] = []
    for v in elem.get("Value") or []:
        if isinstance(v, dict):
            out.append(str(v.get("Alphabetic", "")))
        elif v is not None:
            out.append(str(v))
    return [t for t in out if t != ""]


def is_universal(key: JsonElement) -> bool:
    if key.get("vr") == "SQ":
        items = key.get("Value") or []
        return not items or all(is_universal_item(i) for i in items)
    values = _texts(key)
    return not values or values == ["*"]


def is_universal_item(item: JsonDataset | None) -> bool:
    return not item or all(is_universal(e) for e in item.values())


@lru_cache(maxsize=512)
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text), re.DOTALL)


def _in_range(stored: str, bounds: str) -> bool:
    low, _, high = bounds.partition("-")
    low, high = low.strip(), high.strip()
    if low and stored < low:
        return False
    return not (high and stored[:len(high)] > high)


def element_matches(key: JsonElement, stored: JsonElement | None) -> bool:
    """Whether the stored element matches a (non-universal) key."""
    if is_universal(key):
        return True
    vr = key.get("vr", "")
    if vr == "SQ":
        query_items = [i for i in key.get("Value") or [] if not is_universal_item(i)]
        stored_items = (stored or {}).get("Value") or []
        return all(any(dataset_matches(q, s or {}) for s in stored_items) for q in query_items)
    wanted = _texts(key)
    have = _texts(stored)
    if not have:
        return False
    if vr == "UI":
        return any(h in wanted for h in have)
    if len(wanted) != 1:
        raise UnsupportedKey(f"a {vr} key takes one value")
    want = wanted[0]
    if vr in _RANGE_VRS and "-" in want:
        return any(_in_range(h, want) for h in have)
    if vr in _WILDCARD_VRS and ("*" in want or "?" in want):
        pattern = _pattern(want)
        return any(pattern.fullmatch(h) for h in have)
    if vr == "PN":
        return any(h.rstrip("^") == want.rstrip("^") for h in have)
    return want in have


def dataset_matches(query: JsonDataset, stored: JsonDataset) -> bool:
    """Whether every key of ``query`` matches ``stored``."""
    return all(element_matches(key, stored.get(tag)) for tag, key in query.items()
               if tag != _SPECIFIC_CHARACTER_SET)


def selected(query: JsonDataset, stored: JsonDataset) -> JsonDataset:
    """The return keys of ``query`` with their stored values (absent: empty), in tag order; a
    sequence key with an item returns each stored item reduced to that item's keys."""
    out: JsonDataset = {}
    for tag, key in sorted(query.items()):
        if tag == _SPECIFIC_CHARACTER_SET:
            continue
        have = stored.get(tag)
        vr = key.get("vr", "")
        if vr == "SQ" and have is not None and key.get("Value") and key["Value"][0]:
            wanted = key["Value"][0]
            out[tag] = {"vr": "SQ", "Value": [selected(wanted, item or {}) for item in have.get("Value") or []]}
        elif have is not None:
            out[tag] = have
        else:
            out[tag] = {"vr": vr} if vr else {"vr": "UN"}
    if _SPECIFIC_CHARACTER_SET in stored:
        out[_SPECIFIC_CHARACTER_SET] = stored[_SPECIFIC_CHARACTER_SET]
    return dict(sorted(out.items()))


def single_text(query: JsonDataset, keyword: str) -> str | None:
    """The one non-wildcard value of a key (for an indexed pre-filter), else None."""
    values = _texts(query.get(tag_of(keyword)))
    if len(values) != 1 or "*" in values[0] or "?" in values[0]:
        return None
    return values[0]


def uid_list(query: JsonDataset, keyword: str) -> list[str] | None:
    values = _texts(query.get(tag_of(keyword)))
    return values or None

