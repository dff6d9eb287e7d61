"""The data set check of :mod:`broker.dicom.wellformed`: every well-formed encoding passes (defined and
undefined lengths, nested sequences, both VR forms), and every truncated one is refused, never misread."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from broker.dicom import dimse, wellformed


def worklist_identifier() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Hans"
    ds.PatientID = ""
    sps = Dataset()
    sps.Modality = "CT"
    sps.ScheduledStationAETitle = "CT01"
    sps.ScheduledProcedureStepStartDate = "20261201-20261202"
    code = Dataset()
    code.CodeValue = "X"
    code.CodingSchemeDesignator = "99"
    sps.ScheduledProtocolCodeSequence = [code, Dataset()]
    ds.ScheduledProcedureStepSequence = [sps]
    ds.ReferencedStudySequence = []
    ds.add_new(0x00091010, "LO", "private")
    return ds


def encoded(ds: Dataset, implicit: bool, undefined_lengths: bool) -> bytes:
    """pydicom writes sequences and items with undefined length unless told otherwise (as DCMTK does)."""
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined_lengths
            for item in element.value:
                item.is_undefined_length_sequence_item = undefined_lengths
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


ENCODINGS = [(implicit, undefined) for implicit in (True, False) for undefined in (True, False)]


@pytest.mark.parametrize(("implicit", "undefined"), ENCODINGS)
def test_well_formed_data_sets_pass_and_decode(implicit: bool, undefined: bool) -> None:
    data = encoded(worklist_identifier(), implicit, undefined)
    wellformed.check(data, implicit)
    decoded = dimse.decode_data_set(data, implicit)
    assert str(decoded.PatientName) == "Müller^Hans"
    assert decoded.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence[0].CodeValue == "X"


@pytest.mark.parametrize(("implicit", "undefined"), ENCODINGS)
def test_every_truncation_is_refused_or_ends_on_a_top_level_element(implicit: bool, undefined: bool) -> None:
    """Cut anywhere: either the cut falls between two top-level elements (a shorter, valid data set) or
    the check refuses it; pydicom alone read most of these cuts as valid."""
    data = encoded(worklist_identifier(), implicit, undefined)
    tags = sorted(worklist_identifier().keys())
    boundaries = set()
    for count in range(len(tags) + 1):  # the encodings of the first 0, 1, ... elements end on a boundary
        prefix = worklist_identifier()
        for tag in tags[count:]:
            del prefix[tag]
        boundaries.add(len(encoded(prefix, implicit, undefined)))
    assert len(data) in boundaries
    for cut in range(len(data)):
        if cut in boundaries:
            wellformed.check(data[:cut], implicit)
        else:
            with pytest.raises(wellformed.MalformedDataSet):
                wellformed.check(data[:cut], implicit)


def test_length_past_the_end_names_the_tag() -> None:
    data = encoded(worklist_identifier(), False, False)[:-2]
    with pytest.raises(wellformed.MalformedDataSet) as raised:
        wellformed.check(data, False)
    assert raised.value.tag == 0x00400100  # the last element: Scheduled Procedure Step Sequence
    assert str(raised.value) == "(0040,0100) length past the end"


def test_nesting_beyond_the_limit_is_refused() -> None:
    ds = Dataset()
    inner = ds
    for _ in range(wellformed.MAX_DEPTH + 2):
        item = Dataset()
        inner.ReferencedStudySequence = [item]
        inner = item
    with pytest.raises(wellformed.MalformedDataSet, match="nested deeper"):
        wellformed.check(encoded(ds, True, True), True)
