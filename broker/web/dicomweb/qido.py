"""QIDO-RS query parameters (PS3.18 8.3.4) as a C-FIND identifier: pure translation, no database.

A DICOMweb search must answer what a C-FIND with the same keys answers, so the routes turn the query
string into the very :class:`~pydicom.dataset.Dataset` a modality would send and hand it to the same
finder. What is decided here:

- **match** ``{attribute}={value}``: the attribute by keyword (``PatientID``) or tag (``00100020``),
  inside sequences by a dotted path (``ScheduledProcedureStepSequence.Modality`` or
  ``00400100.00080060``); the value is the C-FIND matching value as written (wildcards ``*`` ``?``,
  ranges ``a-b``); for a UI attribute a comma-separated list is a UID list. An empty value is
  universal matching (a return key). An unknown keyword or tag, a path through something that is
  not a sequence, a value on a sequence, or the same attribute twice is refused.
- **includefield** (repeatable, comma-separated): return keys added to the service's default ones;
  ``all`` asks for every attribute of the information model (:attr:`SearchModel.all_keys`). A
  sequence named whole is returned whole, unless a matching key sits inside it: then its item holds
  the default, matching and included keys (a C-FIND identifier cannot ask for both).
- **limit** / **offset**: unsigned integers; ``limit`` at least 1 (a search for nothing is a mistake).
- **fuzzymatching**, **emptyvaluematching**, **multiplevaluematching**: ``true`` or ``false``. The broker
  does none of them: ``true`` is ignored and answered with a Warning (PS3.18 asks the origin server to
  say so rather than refuse), the matching is literal as in C-FIND.

Anything wrong raises :class:`QidoError`, whose text the route puts in the 400 answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

__all__ = ["FUZZY_IGNORED", "MWL", "UPS", "QidoError", "QidoQuery", "SearchModel", "parse_search", "paths_of"]

FUZZY_IGNORED = "The fuzzymatching parameter is not supported. Only literal matching has been performed."
_NOT_SUPPORTED = "The {name} parameter is not supported; it was ignored."
_CONTROL = ("includefield", "limit", "offset", "fuzzymatching", "emptyvaluematching", "multiplevaluematching")
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_UINT = re.compile(r"\d{1,9}")
_INTEGER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
# Values of these cannot be written in a query string (binary, or a tag list): return keys only.
_NO_MATCHING_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT", "OB or OW", "US or OW"})


class QidoError(ValueError):
    """A query parameter the search cannot use; ``str(error)`` says which and why (for the 400)."""


@dataclass(frozen=True)
class SearchModel:
    """What one search resource returns: the default return keys (dotted keyword paths; a sequence
    alone = the whole sequence) and those of ``includefield=all``."""

    name: str
    default_keys: tuple[str, ...]
    all_keys: tuple[str, ...]


@dataclass(frozen=True)
class QidoQuery:
    """A search decided: the C-FIND identifier, the page asked for and the warnings to answer with."""

    identifier: Dataset
    offset: int = 0
    limit: int | None = None
    warnings: tuple[str, ...] = ()


# --- the two information models ------------------------------------------------------------------
_SPS = "ScheduledProcedureStepSequence"
# What a modality typically asks for (the keys of bench/mwl_items.QuerySpec.identifier, which follow the
# IHE Scheduled Workflow "Query Modality Worklist" return keys, plus the SPS status).
_MWL_DEFAULT = (
    "AccessionNumber", "ReferringPhysicianName", "PatientName", "PatientID", "IssuerOfPatientID",
    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "RequestingPhysician", "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence", "RequestedProcedureID", "RequestedProcedurePriority", "AdmissionID",
    "CurrentPatientLocation",
    *(f"{_SPS}.{k}" for k in (
        "Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
        "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription", "ScheduledProtocolCodeSequence",
        "ScheduledProcedureStepID", "ScheduledStationName", "ScheduledProcedureStepLocation",
        "ScheduledProcedureStepStatus")),
)
# The Modality Worklist information model (PS3.4 Table K.6-1), the SPS Sequence whole.
_MWL_ALL = (
    _SPS, "RequestedProcedureID", "RequestedProcedureDescription", "RequestedProcedureCodeSequence",
    "StudyInstanceUID", "ReferencedStudySequence", "RequestedProcedurePriority", "PatientTransportArrangements",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "RequestingPhysician", "ReferringPhysicianName",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest", "AdmissionID",
    "IssuerOfAdmissionIDSequence", "CurrentPatientLocation", "ReferencedPatientSequence", "PatientName", "PatientID",
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "PatientBirthDate",
    "PatientSex", "PatientWeight", "PatientSize", "ConfidentialityConstraintOnPatientDataDescription",
    "PatientState", "PregnancyStatus", "MedicalAlerts", "Allergies", "SpecialNeeds",
)
# The UPS C-FIND return keys of Type 1 and 2 (PS3.4 Table CC.2.5-3), sequences whole.
_UPS_DEFAULT = (
    "SOPClassUID", "SOPInstanceUID", "ProcedureStepState", "ScheduledProcedureStepPriority", "ProcedureStepLabel",
    "WorklistLabel", "ScheduledProcedureStepStartDateTime", "ExpectedCompletionDateTime",
    "ScheduledProcedureStepModificationDateTime", "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence", "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledHumanPerformersSequence", "ScheduledWorkitemCodeSequence", "ScheduledProcessingParametersSequence",
    "CommentsOnTheScheduledProcedureStep", "InputReadinessState", "InputInformationSequence", "StudyInstanceUID",
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientBirthDate", "PatientSex",
    "AdmissionID", "ReferencedRequestSequence", "ProcedureStepProgressInformationSequence",
    "UnifiedProcedureStepPerformedProcedureSequence",
)
_UPS_ALL = (*_UPS_DEFAULT, "ScheduledProcedureStepExpirationDateTime", "IssuerOfAdmissionIDSequence",
            "MedicalAlerts", "PatientState", "ReplacedProcedureStepSequence", "ProcedureStepCancellationDateTime",
            "ReasonForCancellation")

MWL = SearchModel("mwlitems", _MWL_DEFAULT, _MWL_ALL)
UPS = SearchModel("workitems", _UPS_DEFAULT, _UPS_ALL)


# --- the identifier tree ---------------------------------------------------------------------------
@dataclass
class _Node:
    """One attribute of the identifier being built: a matching value (``None``: return key only) or,
    for a sequence, the keys of its one item and whether it was asked for whole."""

    tag: int
    vr: str
    value: Any = None
    children: dict[int, _Node] = field(default_factory=dict)
    whole: bool = False
    matched: bool = False  # a match parameter named it (twice is refused)

    def has_matching_key(self) -> bool:
        return self.value is not None or any(c.has_matching_key() for c in self.children.values())


def parse_search(params: Iterable[tuple[str, str]], model: SearchModel) -> QidoQuery:
    """The :class:`QidoQuery` of a search's query parameters (in the order sent, repeats kept);
    raises :class:`QidoError` for anything the search cannot use."""
    root: dict[int, _Node] = {}
    for path in model.default_keys:
        _add_return_key(root, _path(path), explicit=False)
    limit: int | None = None
    offset: int | None = None
    warnings: list[str] = []
    included_all = included_other = False
    non_ascii = False
    for name, raw in params:
        control = name.lower()
        if control == "includefield":
            for entry in (e.strip() for e in raw.split(",")):
                if entry == "all":
                    included_all = True
                    for path in model.all_keys:
                        _add_return_key(root, _path(path), explicit=True)
                elif entry:
                    included_other = True
                    _add_return_key(root, _path(entry), explicit=True)
                else:
                    raise QidoError("includefield: empty attribute")
        elif control in ("limit", "offset"):
            number = _uint(control, raw)
            if control == "limit":
                if limit is not None:
                    raise QidoError("limit given twice")
                if number < 1:
                    raise QidoError("limit must be at least 1")
                limit = number
            else:
                if offset is not None:
                    raise QidoError("offset given twice")
                offset = number
        elif control in _CONTROL:
            if _boolean(control, raw):
                warnings.append(FUZZY_IGNORED if control == "fuzzymatching" else _NOT_SUPPORTED.format(name=control))
        else:
            non_ascii |= not raw.isascii()
            _add_match(root, _path(name), raw)
    if included_all and included_other:
        raise QidoError("includefield=all excludes naming other attributes")
    identifier = _dataset(root)
    if non_ascii:
        # Query strings are UTF-8 (RFC 3986); the identifier says so as a modality would.
        identifier.SpecificCharacterSet = "ISO_IR 192"
    return QidoQuery(identifier, offset or 0, limit, tuple(dict.fromkeys(warnings)))


def _uint(name: str, raw: str) -> int:
    if not _UINT.fullmatch(raw.strip()):
        raise QidoError(f"{name} must be an unsigned integer, not {raw[:20]!r}")
    return int(raw)


def _boolean(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text not in ("true", "false"):
        raise QidoError(f"{name} must be true or false, not {raw[:20]!r}")
    return text == "true"


def _path(text: str) -> list[tuple[int, str]]:
    """``(tag, VR)`` of each attribute of a dotted path; every one but the last a sequence."""
    parts = text.strip().split(".")
    out: list[tuple[int, str]] = []
    for n, part in enumerate(parts):
        tag = _tag(part, text)
        vr = str(dictionary_VR(tag))
        if n < len(parts) - 1 and vr != "SQ":
            raise QidoError(f"{text[:80]}: {part} is not a sequence")
        out.append((tag, vr))
    return out


def _tag(part: str, whole: str) -> int:
    if _TAG.fullmatch(part):
        tag = int(part, 16)
        _dataset_attribute(tag, part)
        if keyword_for_tag(tag) == "":
            raise QidoError(f"unknown attribute {part} (a private or unregistered tag)")
    else:
        found = tag_for_keyword(part)
        if found is None:
            raise QidoError(f"unknown attribute {part[:64]!r}" + (f" in {whole[:80]!r}" if part != whole else ""))
        tag = int(found)
        _dataset_attribute(tag, part)
    if tag == 0x00080005:
        raise QidoError("SpecificCharacterSet is not a matching key (query strings are UTF-8)")
    return tag


def _dataset_attribute(tag: int, part: str) -> None:
    """Refuse command and file meta elements and group lengths: no identifier holds them."""
    if tag >> 16 in (0x0000, 0x0002) or tag & 0xFFFF == 0:
        raise QidoError(f"{part}: not an attribute of a dataset")


def _node(level: dict[int, _Node], tag: int, vr: str) -> _Node:
    node = level.get(tag)
    if node is None:
        node = level[tag] = _Node(tag, vr)
    return node


def _add_return_key(root: dict[int, _Node], path: list[tuple[int, str]], explicit: bool) -> None:
    level = root
    for tag, vr in path[:-1]:
        level = _node(level, tag, vr).children
    tag, vr = path[-1]
    node = _node(level, tag, vr)
    if vr == "SQ" and explicit:
        node.whole = True


def _add_match(root: dict[int, _Node], path: list[tuple[int, str]], raw: str) -> None:
    level = root
    for tag, vr in path[:-1]:
        level = _node(level, tag, vr).children
    tag, vr = path[-1]
    node = _node(level, tag, vr)
    name = keyword_for_tag(tag)
    if node.matched:
        raise QidoError(f"{name} given twice")
    node.matched = True
    if raw == "":
        return  # universal matching: a return key
    if vr == "SQ":
        raise QidoError(f"{name} is a sequence: match on the attributes inside it ({name}.Keyword=value)")
    node.value = _value(name, vr, raw)


def _value(name: str, vr: str, raw: str) -> Any:
    """The identifier value of a matching key, as a modality would write it."""
    if vr in _NO_MATCHING_VRS:
        raise QidoError(f"{name} (VR {vr}) cannot be matched on; name it in includefield instead")
    if vr == "UI":
        uids = [u.strip() for u in raw.replace("\\", ",").split(",")]
        if any(not u for u in uids):
            raise QidoError(f"{name}: empty UID in the list")
        return uids if len(uids) > 1 else uids[0]
    try:
        if vr in _INTEGER_VRS:
            return int(raw)
        if vr in _FLOAT_VRS:
            return float(raw)
    except ValueError:
        raise QidoError(f"{name}: not a number {raw[:20]!r}") from None
    return raw


def _dataset(level: dict[int, _Node]) -> Dataset:
    dataset = Dataset()
    for tag in sorted(level):
        node = level[tag]
        value: Any
        if node.vr == "SQ":
            if node.children and not (node.whole and not node.has_matching_key()):
                value = DicomSequence([_dataset(node.children)])
            else:
                value = DicomSequence([])
        else:
            value = "" if node.value is None else node.value
        vr = node.vr.split(" or ")[0]
        try:
            dataset.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
        except (ValueError, TypeError, OverflowError):  # IS / DS text that is no number
            raise QidoError(f"{keyword_for_tag(tag)}: {str(value)[:20]!r} is not a valid {vr}") from None
    return dataset


def paths_of(dataset: Dataset, prefix: str = "") -> Sequence[str]:
    """The dotted keyword paths of a dataset's attributes (for tests and documentation)."""
    out: list[str] = []
    for elem in dataset:
        path = prefix + elem.keyword
        out.append(path)
        if elem.VR == "SQ" and elem.value:
            out.extend(paths_of(elem.value[0], path + "."))
    return out
