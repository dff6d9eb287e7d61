"""The procedure state machine's table, the event backoff, and the pipeline's settings."""

from __future__ import annotations

import pytest

from broker.config import Peer, SettingsError, load_settings
from broker.domain.procedure_states import ALLOWED, ProcedureState, is_allowed
from broker.outbox.runner import backoff_delay

S = ProcedureState


@pytest.mark.parametrize(("current", "target"), [
    (S.SCHEDULED, S.ARRIVED), (S.ARRIVED, S.STARTED), (S.STARTED, S.COMPLETED), (S.STARTED, S.DISCONTINUED),
    (S.COMPLETED, S.IMAGES_AVAILABLE), (S.IMAGES_AVAILABLE, S.ARCHIVED), (S.IMAGES_AVAILABLE, S.COMMIT_FAILED),
    (S.COMMIT_FAILED, S.ARCHIVED),
    # skipping forward, as the real world does
    (S.SCHEDULED, S.STARTED), (S.STARTED, S.IMAGES_AVAILABLE), (S.COMPLETED, S.ARCHIVED),
    (S.SCHEDULED, S.CANCELED), (S.ARRIVED, S.CANCELED),
])
def test_allowed(current: S, target: S) -> None:
    assert is_allowed(current, target)


@pytest.mark.parametrize(("current", "target"), [
    (S.STARTED, S.SCHEDULED), (S.COMPLETED, S.STARTED), (S.IMAGES_AVAILABLE, S.COMPLETED),
    (S.ARCHIVED, S.COMMIT_FAILED), (S.COMPLETED, S.DISCONTINUED), (S.DISCONTINUED, S.COMPLETED),
    (S.STARTED, S.CANCELED), (S.CANCELED, S.STARTED), (S.STARTED, S.STARTED),
])
def test_backward_sideways_and_repeats_are_not(current: S, target: S) -> None:
    assert not is_allowed(current, target)


def test_every_state_has_a_row_and_final_states_go_nowhere() -> None:
    assert set(ALLOWED) == set(ProcedureState)
    assert ALLOWED[S.ARCHIVED] == ALLOWED[S.CANCELED] == frozenset()
    assert not is_allowed("NONSENSE", "STARTED")


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [backoff_delay(n, 1, 300) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert backoff_delay(1, 0.5, 300) == 0.5


def test_pipeline_settings_defaults() -> None:
    settings = load_settings()
    assert (settings.event_max_attempts, settings.event_backoff_base, settings.event_backoff_max) == (10, 1, 300)
    assert (settings.event_lease_seconds, settings.event_poll_interval, settings.stgcmt_timeout) == (60, 0.5, 3600)
    assert settings.ris_status_message_type == "ORM^O01"
    assert settings.ris_transitions == {"STARTED", "COMPLETED", "DISCONTINUED"}
    assert settings.peers == {} and settings.ris_address is None


def test_peers_archive_and_forward_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_DICOM_PEERS", "ARCHIVE@pacs.local:104, MPPSMGR@10.0.0.9:11113")
    monkeypatch.setenv("BROKER_STGCMT_ARCHIVE_AE", "ARCHIVE")
    monkeypatch.setenv("BROKER_MPPS_FORWARD_AES", "MPPSMGR")
    monkeypatch.setenv("BROKER_RIS_HL7_ADDRESS", "ris.local:2576")
    settings = load_settings()
    assert settings.peers == {"ARCHIVE": Peer("ARCHIVE", "pacs.local", 104),
                              "MPPSMGR": Peer("MPPSMGR", "10.0.0.9", 11113)}
    assert settings.mpps_forward_targets == ["MPPSMGR"]
    assert settings.ris_address == ("ris.local", 2576)


@pytest.mark.parametrize(("name", "value", "words"), [
    ("DICOM_PEERS", "ARCHIVE:104", "AE@host:port"),
    ("DICOM_PEERS", "ARCHIVE@pacs", "AE@host:port"),
    ("DICOM_PEERS", "A@h:1,A@h:2", "twice"),
    ("STGCMT_ARCHIVE_AE", "NOPE", "not one of BROKER_DICOM_PEERS"),
    ("MPPS_FORWARD_AES", "NOPE", "not one of BROKER_DICOM_PEERS"),
    ("RIS_HL7_ADDRESS", "ris", "host:port"),
    ("RIS_STATUS_TRANSITIONS", "STARTED,SCHEDULED", "cannot be reported"),
    ("RIS_STATUS_MESSAGE_TYPE", "ADT^A01", "ORM^O01"),
])
def test_bad_pipeline_setting_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                words: str) -> None:
    monkeypatch.setenv(f"BROKER_{name}", value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert f"BROKER_{name}" in str(raised.value) and words in str(raised.value)
