"""The UPS attribute set of a step (PS3.4 Table CC.2.5-3), built from its worklist item.

One stored item, two views: the worklist item (DICOM JSON) is the source; the UPS attributes are
derived from it (patient, study, request, scheduling) and overlaid with what UPS SCUs set on the
workitem (N-CREATE / N-SET, kept in ``ups_workitems.attributes``). The state always comes from the
step status and the patient from the item, so an ADT update or an MPPS shows in the UPS view at once.
"""

from __future__ import annotations

from broker.dicom_json import JsonDataset, element, tag_of, value
from broker.domain.ups_states import ups_state
from broker.domain.worklist_item import step_item

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
UPS_QUERY = "1.2.840.10008.5.1.4.34.6.5"
# The well-known SOP instances of global subscriptions (PS3.4 CC.3.1).
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
FILTERED_GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5.1"

# The coding scheme of the broker's own codes (station names): a private ("99") designator.
LOCAL_SCHEME = "99WLBROKER"
# Requested Procedure Priority (MWL) -> Scheduled Procedure Step Priority (UPS: HIGH, MEDIUM, LOW).
_PRIORITY = {"STAT": "HIGH", "HIGH": "HIGH", "MEDIUM": "MEDIUM", "ROUTINE": "MEDIUM", "LOW": "LOW"}
# Attributes of the worklist item a UPS carries as they are.
_PATIENT_AND_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                      "PatientSex", "OtherPatientIDsSequence", "AdmissionID", "StudyInstanceUID", "MedicalAlerts",
                      "PatientState")
# Always from the item (the patient may have been updated by ADT since UPS set anything).
_FROM_ITEM_ALWAYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                     "OtherPatientIDsSequence")
# Never shown (PS3.4 CC.2.6: the Transaction UID is not returned).
_HIDDEN = (tag_of("TransactionUID"),)


def code_item(code_value: str, meaning: str, scheme: str = LOCAL_SCHEME) -> JsonDataset:
    return {tag_of("CodeValue"): element("CodeValue", code_value[:16]),
            tag_of("CodingSchemeDesignator"): element("CodingSchemeDesignator", scheme),
            tag_of("CodeMeaning"): element("CodeMeaning", meaning[:64])}


def derived_attributes(item: JsonDataset) -> JsonDataset:
    """The UPS attributes a worklist item implies (no state, no UIDs)."""
    sps = step_item(item)
    ups: JsonDataset = {}
    for keyword in _PATIENT_AND_STUDY:
        if tag_of(keyword) in item:
            ups[tag_of(keyword)] = item[tag_of(keyword)]
    date, time = value(sps, "ScheduledProcedureStepStartDate"), value(sps, "ScheduledProcedureStepStartTime")
    ups[tag_of("ScheduledProcedureStepStartDateTime")] = element("ScheduledProcedureStepStartDateTime",
                                                                 date + time if date else "")
    priority = _PRIORITY.get(value(item, "RequestedProcedurePriority").upper(), "MEDIUM")
    ups[tag_of("ScheduledProcedureStepPriority")] = element("ScheduledProcedureStepPriority", priority)
    label = value(sps, "ScheduledProcedureStepDescription") or value(item, "RequestedProcedureDescription")
    ups[tag_of("ProcedureStepLabel")] = element("ProcedureStepLabel", label or value(sps, "ScheduledProcedureStepID"))
    station_ae, station_name = value(sps, "ScheduledStationAETitle"), value(sps, "ScheduledStationName")
    ups[tag_of("WorklistLabel")] = element("WorklistLabel", station_ae or value(sps, "Modality"))
    station = station_name or station_ae
    ups[tag_of("ScheduledStationNameCodeSequence")] = element(
        "ScheduledStationNameCodeSequence", [code_item(station, station)] if station else [])
    protocol = sps.get(tag_of("ScheduledProtocolCodeSequence"), {}).get("Value") \
        or item.get(tag_of("RequestedProcedureCodeSequence"), {}).get("Value") or []
    ups[tag_of("ScheduledWorkitemCodeSequence")] = element("ScheduledWorkitemCodeSequence", protocol[:1])
    performer = value(sps, "ScheduledPerformingPhysicianName")
    ups[tag_of("ScheduledHumanPerformersSequence")] = element("ScheduledHumanPerformersSequence", [
        {tag_of("HumanPerformerName"): element("HumanPerformerName", performer)}] if performer else [])
    ups[tag_of("InputReadinessState")] = element("InputReadinessState", "READY")
    ups[tag_of("ReferencedRequestSequence")] = element("ReferencedRequestSequence", [_request(item)])
    return ups


def _request(item: JsonDataset) -> JsonDataset:
    request: JsonDataset = {}
    for keyword in ("AccessionNumber", "StudyInstanceUID", "RequestedProcedureID", "RequestedProcedureDescription",
                    "RequestedProcedureCodeSequence", "PlacerOrderNumberImagingServiceRequest",
                    "FillerOrderNumberImagingServiceRequest", "RequestingPhysician", "ReferringPhysicianName"):
        request[tag_of(keyword)] = item.get(tag_of(keyword)) or element(keyword, "")
    return dict(sorted(request.items()))


def workitem(uid: str, item: JsonDataset, sps_status: str, attributes: JsonDataset | None) -> JsonDataset:
    """The whole UPS of a step: derived attributes, overlaid by the UPS-set ones, then the state, the
    identity and the patient as they are now; in tag order."""
    ups = derived_attributes(item)
    if attributes:
        ups.update(attributes)
    for keyword in _FROM_ITEM_ALWAYS:
        if tag_of(keyword) in item:
            ups[tag_of(keyword)] = item[tag_of(keyword)]
    ups[tag_of("SOPClassUID")] = element("SOPClassUID", UPS_PUSH)
    ups[tag_of("SOPInstanceUID")] = element("SOPInstanceUID", uid)
    ups[tag_of("ProcedureStepState")] = element("ProcedureStepState", str(ups_state(sps_status)))
    for hidden in _HIDDEN:
        ups.pop(hidden, None)
    return dict(sorted(ups.items()))

