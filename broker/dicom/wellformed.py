"""Is a request's data set well formed (PS3.5 7.1, 7.5)? Checked on the bytes, before pydicom reads them.

pydicom reads forgivingly: an element header cut short at the end of the data set is dropped without a
word, and a value length past the end yields a shorter value. A worklist query built from such bytes
was answered as if it were fine, and a UPS N-SET stored the remains. So every request's data set is
walked here once, headers and lengths only (no values decoded), nested sequences and items included;
for a worklist identifier of some 30 elements that costs tens of microseconds. What it reports names
tags and byte offsets only, never a value: it goes into logs and Error Comments.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from pydicom.datadict import dictionary_VR

_TAG_LENGTH = struct.Struct("<HHL")  # an implicit VR element header, and every item / delimiter header
_TAG_VR_SHORT = struct.Struct("<HH2sH")  # explicit VR with a two-byte length
_LONG_LENGTH = struct.Struct("<L")
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VR elements with two reserved bytes and a four-byte length (PS3.5 table 7.1-1); the others
# have a two-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
# Deeper nesting than any IOD needs: refused rather than recursed into.
MAX_DEPTH = 16


class MalformedDataSet(ValueError):
    """The data set's bytes are not a well-formed data set; the text names the tag or the byte offset."""

    def __init__(self, text: str, tag: int | None = None) -> None:
        super().__init__(text)
        self.tag = tag


def tag_text(tag: int) -> str:
    """``(gggg,eeee)``, as PS3.5 writes tags."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def check(data: bytes, is_implicit_vr: bool) -> None:
    """Raise :class:`MalformedDataSet` unless ``data`` is a whole, well-formed Little Endian data set."""
    _elements(memoryview(data), 0, len(data), is_implicit_vr, 0, in_undefined_item=False)


@lru_cache(maxsize=2048)  # bounded: the tags come from the peer
def _implicit_sequence(tag: int) -> bool:
    """In Implicit VR only the data dictionary says that a defined-length element is a sequence."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _elements(data: memoryview, offset: int, end: int, implicit: bool, depth: int, in_undefined_item: bool) -> int:
    """Walk the elements from ``offset`` to ``end`` (or to the item's delimiter); the offset after them."""
    if depth > MAX_DEPTH:
        raise MalformedDataSet(f"sequences nested deeper than {MAX_DEPTH}")
    while offset < end:
        if offset + 8 > end:
            raise MalformedDataSet(f"element header cut short at byte {offset}")
        group, element, length = _TAG_LENGTH.unpack_from(data, offset)
        tag = group << 16 | element
        if group == 0xFFFE:
            if tag == _ITEM_END and in_undefined_item:
                return offset + 8
            raise MalformedDataSet(f"{tag_text(tag)} where a data element was expected (byte {offset})", tag)
        items_implicit = implicit
        if implicit:
            start = offset + 8
            sequence = length == _UNDEFINED or _implicit_sequence(tag)
        else:
            vr = bytes(data[offset + 4:offset + 6])
            if vr in _SHORT_VRS:
                length = _TAG_VR_SHORT.unpack_from(data, offset)[3]
                start = offset + 8
            elif vr in _LONG_VRS:
                if offset + 12 > end:
                    raise MalformedDataSet(f"element header cut short at byte {offset}", tag)
                (length,) = _LONG_LENGTH.unpack_from(data, offset + 8)
                start = offset + 12
            else:
                raise MalformedDataSet(f"{tag_text(tag)} has no valid VR", tag)
            sequence = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)
            items_implicit = vr == b"UN"  # UN of undefined length holds Implicit VR items (PS3.5 6.2.2)
            if length == _UNDEFINED and not sequence:
                raise MalformedDataSet(f"{tag_text(tag)}: undefined length in a {vr.decode()}", tag)
        if length == _UNDEFINED:
            offset = _items(data, start, end, items_implicit, depth, tag, undefined=True)
            continue
        value_end = start + length
        if value_end > end:
            raise MalformedDataSet(f"{tag_text(tag)} length past the end", tag)
        if sequence:
            _items(data, start, value_end, implicit, depth, tag, undefined=False)
        offset = value_end
    if in_undefined_item:
        raise MalformedDataSet("an item of undefined length without its delimiter")
    return offset


def _items(data: memoryview, offset: int, end: int, implicit: bool, depth: int, tag: int, undefined: bool) -> int:
    """Walk the items of the sequence ``tag``; the offset after it (after its delimiter when undefined)."""
    while True:
        if offset >= end and not undefined:
            return offset
        if offset + 8 > end:
            raise MalformedDataSet(f"sequence {tag_text(tag)} cut short", tag)
        group, element, length = _TAG_LENGTH.unpack_from(data, offset)
        item_tag = group << 16 | element
        if item_tag == _SEQUENCE_END and undefined:
            return offset + 8
        if item_tag != _ITEM:
            raise MalformedDataSet(f"{tag_text(tag)}: {tag_text(item_tag)} where an item belongs", tag)
        start = offset + 8
        if length == _UNDEFINED:
            offset = _elements(data, start, end, implicit, depth + 1, in_undefined_item=True)
            continue
        if start + length > end:
            raise MalformedDataSet(f"{tag_text(tag)} item length past the end", tag)
        _elements(data, start, start + length, implicit, depth + 1, in_undefined_item=False)
        offset = start + length
