"""DICOM JSON encoded straight to bytes must read back as what pydicom makes of the same JSON."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from broker.dicom.dimse import encode_data_set
from broker.dicom.encoding import NotDirectlyEncodable, encode_json_data_set

WORKLIST_ITEM: dict[str, Any] = {
    "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
    "00080050": {"vr": "SH", "Value": ["A0001"]},
    "00080090": {"vr": "PN"},
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "MÜLLER^JÖRG"}]},
    "00100020": {"vr": "LO", "Value": ["PID-1"]},
    "00100030": {"vr": "DA", "Value": ["19700101"]},
    "00101020": {"vr": "DS", "Value": [1.75]},
    "00101030": {"vr": "DS", "Value": [72]},
    "00200013": {"vr": "IS", "Value": [3]},
    "00280010": {"vr": "US", "Value": [512]},
    "00181150": {"vr": "IS"},
    "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.10.543.1"]},
    "00321060": {"vr": "LO", "Value": ["CT HEAD"]},
    "00321064": {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["CTHD"]},
                                        "00080102": {"vr": "SH", "Value": ["99LOCAL"]},
                                        "00080104": {"vr": "LO", "Value": ["CT head"]}}]},
    "00400100": {"vr": "SQ", "Value": [{
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00400001": {"vr": "AE", "Value": ["CT01"]},
        "00400002": {"vr": "DA", "Value": ["20261201"]},
        "00400003": {"vr": "TM", "Value": ["0930"]},
        "00400008": {"vr": "SQ"},
        "00400009": {"vr": "SH", "Value": ["S1"]},
        "00400020": {"vr": "CS", "Value": ["SCHEDULED"]},
        "00400006": {"vr": "PN", "Value": [{"Alphabetic": "SMITH^ANN", "Phonetic": "smith^ann"}]},
    }]},
    "00380010": {"vr": "LO"},
    "00081080": {"vr": "LO", "Value": ["one", "two", None]},
}


def pydicom_reading(data: bytes, implicit: bool) -> Dataset:
    return read_dataset(BytesIO(data), is_implicit_VR=implicit, is_little_endian=True)


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_item_reads_back_equal_to_pydicom_from_json(implicit: bool, charset: str) -> None:
    item = {**WORKLIST_ITEM, "00080005": {"vr": "CS", "Value": [charset]}}
    data = encode_json_data_set(item, implicit)
    ours = pydicom_reading(data, implicit)
    reference = Dataset.from_json(item)
    assert ours == reference
    assert str(ours.PatientName) == "MÜLLER^JÖRG"
    assert ours.ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName == "SMITH^ANN==smith^ann"
    assert ours.PatientSize == pytest.approx(1.75) and ours.Rows == 512
    assert len(data) % 2 == 0


def test_bytes_equal_pydicoms_for_explicit_vr() -> None:
    """Byte for byte the same as pydicom's writer (defined-length sequences on both sides), but for an
    integer DS, which pydicom writes as "72.0" and this as "72" (both valid decimal strings)."""
    item = {tag: elem for tag, elem in WORKLIST_ITEM.items() if tag != "00101030"}
    reference = Dataset.from_json(item)
    assert encode_json_data_set(item, False) == encode_data_set(reference, False)


@pytest.mark.parametrize("item", [
    {"00080005": {"vr": "CS", "Value": ["ISO 2022 IR 6", "ISO 2022 IR 87"]}},
    {"00209165": {"vr": "AT", "Value": ["00100010"]}},
    {"00420011": {"vr": "OB", "InlineBinary": "AAAA"}},
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "王^小明"}]}},  # default repertoire: not encodable
    {"00080005": {"vr": "CS", "Value": ["ISO_IR 999"]}},
])
def test_what_it_leaves_to_pydicom_is_said(item: dict[str, Any]) -> None:
    with pytest.raises(NotDirectlyEncodable):
        encode_json_data_set(item, False)


def test_the_dimse_layer_falls_back_to_pydicom() -> None:
    item: dict[str, Any] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]},
                            "00209165": {"vr": "AT", "Value": ["00100010"]},
                            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "王^小明"}]}}
    ours = pydicom_reading(encode_data_set(item, False), False)
    assert ours.DimensionIndexPointer == 0x00100010 and str(ours.PatientName) == "王^小明"
