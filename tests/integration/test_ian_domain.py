"""IAN N-CREATE rules and effects (PS3.4 R, spec section 6) on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from broker.ian.service import IanService
from broker.mapping.rules import MappingSet
from broker.mpps.service import MppsService
from broker.store.tables import IanNotification, InstanceAvailability
from broker.workflow.context import WorkflowConfig
from broker.workflow.outcome import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    SUCCESS,
)
from tests.events_support import (
    commitment,
    ian,
    mpps_create,
    mpps_final,
    outbox,
    procedure_state,
    rows,
    schedule,
    timeline,
)

pytestmark = pytest.mark.integration
CONFIG = WorkflowConfig(ris_transitions=frozenset({"STARTED", "COMPLETED", "DISCONTINUED"}), archive_ae="ARCHIVE")


@pytest.fixture
def service(engine: Engine) -> IanService:
    return IanService(engine, CONFIG)


def test_ian_after_mpps_completed_makes_images_available_without_a_second_request(
        engine: Engine, mappings: MappingSet, service: IanService) -> None:
    order = schedule(engine, mappings)
    mpps = MppsService(engine, CONFIG)
    uid, images = generate_uid(), [generate_uid(), generate_uid()]
    mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    mpps.update(uid, mpps_final("COMPLETED", images), "CT01")
    ian_uid = generate_uid()
    assert service.create(ian_uid, ian(order.study_instance_uid, uid, images), "ARCHIVE").status == SUCCESS
    assert procedure_state(engine, order.procedure_pk) == "IMAGES AVAILABLE"
    assert timeline(engine, order.procedure_pk)[-1] == ("COMPLETED", "IMAGES AVAILABLE", "ian")
    assert {r.availability for r in rows(engine, InstanceAvailability)} == {"ONLINE"}
    assert len(commitment(engine)) == 1  # same instances: the MPPS's request stands
    [notification] = rows(engine, IanNotification)
    assert notification.procedure_fk == order.procedure_pk and notification.calling_ae == "ARCHIVE"


def test_ian_before_mpps_completed_skips_forward_and_ris_still_gets_cm(
        engine: Engine, mappings: MappingSet, service: IanService) -> None:
    order = schedule(engine, mappings)
    mpps = MppsService(engine, CONFIG)
    uid, images = generate_uid(), [generate_uid()]
    mpps.create(uid, mpps_create(order.study_instance_uid, order.sps_id), "CT01")
    assert service.create(generate_uid(), ian(order.study_instance_uid, uid, images), "ARCHIVE").ok
    assert procedure_state(engine, order.procedure_pk) == "IMAGES AVAILABLE"
    assert len(commitment(engine)) == 1  # requested on the IAN
    assert mpps.update(uid, mpps_final("COMPLETED", images), "CT01").ok
    assert procedure_state(engine, order.procedure_pk) == "IMAGES AVAILABLE"  # never backward
    assert [r.payload["order_status"] for r in outbox(engine, "ris.status")] == ["IP", "CM"]
    assert len(commitment(engine)) == 1


def test_correlates_by_study_without_mpps(engine: Engine, mappings: MappingSet, service: IanService) -> None:
    order = schedule(engine, mappings)
    assert service.create(generate_uid(), ian(order.study_instance_uid, None, [generate_uid()]), "ARCHIVE").ok
    assert timeline(engine, order.procedure_pk) == [("SCHEDULED", "IMAGES AVAILABLE", "ian")]


def test_unknown_study_is_accepted_and_touches_no_procedure(engine: Engine, mappings: MappingSet,
                                                            service: IanService) -> None:
    order = schedule(engine, mappings)
    image = generate_uid()
    assert service.create(generate_uid(), ian("1.2.999.1", generate_uid(), [image]), "ARCHIVE").status == SUCCESS
    assert procedure_state(engine, order.procedure_pk) == "SCHEDULED"
    assert timeline(engine, order.procedure_pk) == []
    [notification] = rows(engine, IanNotification)
    assert notification.procedure_fk is None
    [instance] = rows(engine, InstanceAvailability)
    assert (instance.sop_instance_uid, instance.procedure_fk) == (image, None)
    assert commitment(engine) == [] and outbox(engine) == []


def test_offline_only_does_not_make_images_available(engine: Engine, mappings: MappingSet,
                                                     service: IanService) -> None:
    order = schedule(engine, mappings)
    assert service.create(generate_uid(), ian(order.study_instance_uid, None, [generate_uid()], "OFFLINE"),
                          "ARCHIVE").ok
    assert procedure_state(engine, order.procedure_pk) == "SCHEDULED"


def test_duplicate_ian_is_0111(engine: Engine, service: IanService) -> None:
    uid = generate_uid()
    assert service.create(uid, ian("1.2.3", None, [generate_uid()]), "ARCHIVE").ok
    assert service.create(uid, ian("1.2.3", None, [generate_uid()]), "ARCHIVE").status == DUPLICATE_SOP_INSTANCE
    assert len(rows(engine, InstanceAvailability)) == 1


def test_missing_and_invalid_attributes(engine: Engine, service: IanService) -> None:
    no_study = ian("1.2.3", None, [generate_uid()])
    del no_study.StudyInstanceUID
    outcome = service.create(generate_uid(), no_study, "ARCHIVE")
    assert (outcome.status, outcome.offending) == (MISSING_ATTRIBUTE, (0x0020000D,))
    no_retrieve = ian("1.2.3", None, [generate_uid()])
    del no_retrieve.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].RetrieveAETitle
    assert service.create(generate_uid(), no_retrieve, "ARCHIVE").offending == (0x00080054,)
    empty_series = ian("1.2.3", None, [])
    assert service.create(generate_uid(), empty_series, "ARCHIVE").status == MISSING_ATTRIBUTE_VALUE
    bad = ian("1.2.3", None, [generate_uid()], availability="SOMEWHERE")
    assert service.create(generate_uid(), bad, "ARCHIVE").status == INVALID_ATTRIBUTE_VALUE
    assert rows(engine, IanNotification) == [] and rows(engine, InstanceAvailability) == []


