"""Reading the attributes of an N-CREATE / N-SET dataset (pydicom) by keyword, and checking Type 1.

The services work on pydicom datasets as the edge received them and store DICOM JSON (PS3.18 F.2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword

from broker.dicom_json import JsonDataset


def tag(keyword: str) -> int:
    """The tag of a keyword as an int (0x00400252)."""
    found = tag_for_keyword(keyword)
    if found is None:  # pragma: no cover - keywords are constants of this package
        raise KeyError(keyword)
    return int(found)


def has_value(dataset: Dataset, keyword: str) -> bool:
    """Whether the attribute is present with a value (a sequence: with at least one item)."""
    if keyword not in dataset:
        return False
    elem = dataset[keyword]
    if elem.VR == "SQ":
        return len(elem.value or []) > 0
    return not elem.is_empty


def text(dataset: Dataset, keyword: str) -> str:
    """The attribute's (first) value as text; '' when absent or empty."""
    if keyword not in dataset:
        return ""
    elem = dataset[keyword]
    if elem.is_empty or elem.VR == "SQ":
        return ""
    value: Any = elem.value
    if elem.VM > 1:
        value = value[0]
    return str(value).strip()


def items(dataset: Dataset, keyword: str) -> list[Dataset]:
    """The items of a sequence attribute ([] when absent or empty)."""
    if keyword not in dataset or dataset[keyword].VR != "SQ":
        return []
    return list(dataset[keyword].value or [])


def missing(dataset: Dataset, keywords: Iterable[str]) -> tuple[list[str], list[str]]:
    """Type 1 check: (keywords absent, keywords present without a value)."""
    absent = [k for k in keywords if k not in dataset]
    empty = [k for k in keywords if k in dataset and not has_value(dataset, k)]
    return absent, empty


def to_json(dataset: Dataset) -> JsonDataset:
    """The dataset as DICOM JSON (binary values inline, base64)."""
    result: JsonDataset = dataset.to_json_dict(bulk_data_threshold=1 << 30)
    return result
