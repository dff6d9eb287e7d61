"""What the board shows: patients on the wall (privacy setting), readable timeline causes, and the
board's zone (its "today", stored times converted to it)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from broker.board.causes import readable
from broker.board.privacy import initials, wall_patient
from broker.board.zone import board_zone, host_zone_name, recorded, scheduled, today

UID = "1.2.826.0.1.3680043.10.543.77001.4"


def test_wall_shows_initials_and_the_last_digits_never_the_name() -> None:
    assert initials("MÜLLER^ERIKA^ANNA") == "M.E.A."
    assert initials("VAN DER BERG^JAN") == "V.D.B.J."
    assert initials("") == ""
    assert wall_patient("MÜLLER^ERIKA", "PID12345678", "initials", 4) == "M.E. ·5678"
    assert wall_patient("MÜLLER^ERIKA", "PID12345678", "initials", 0) == "M.E."
    assert wall_patient("MÜLLER^ERIKA=ミュラー^エリカ", "12", "initials", 4) == "M.E. ·12"
    assert wall_patient("MÜLLER^ERIKA", "PID12345678", "none", 4) == ""
    assert wall_patient("MÜLLER^ERIKA", "PID12345678", "full", 4) == "MÜLLER, ERIKA (PID12345678)"
    for mode in ("initials", "none"):
        assert "MÜLLER" not in wall_patient("MÜLLER^ERIKA", "PID12345678", mode, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "text", "station", "shown"), [
    ("mpps", f"MPPS {UID} IN PROGRESS", "CT01", "MPPS from CT01: in progress"),
    ("mpps", f"MPPS {UID} COMPLETED", "", "MPPS: completed"),
    ("ups", f"UPS {UID} IN PROGRESS by CT02", "", "UPS from CT02: in progress"),
    ("ups", f"UPS {UID} N-CREATE by CT02", "", "UPS from CT02: workitem created"),
    ("ups", f"UPS {UID} cancel requested by RIS", "", "UPS from RIS: cancel requested"),
    ("ian", f"IAN {UID}", "PACS", "IAN from PACS: images available"),
    ("stgcmt", f"Storage Commitment {UID} committed", "ARCHIVE", "Storage Commitment from ARCHIVE: committed"),
    ("stgcmt", f"Storage Commitment {UID}: no answer within 3600 s", "ARCHIVE",
     "Storage Commitment from ARCHIVE: no answer within 3600 s"),
    ("hl7", "HL7 ORM^O01 RIS000101", "", "HL7 ORM^O01"),  # the control ID behind the details toggle
    ("retention", "retention: not started by 2026-12-04 09:00 + 24 h", "",
     "retention: not started by 2026-12-04 09:00 + 24 h"),
])
def test_causes_read_as_sentences_without_the_uid(kind: str, text: str, station: str, shown: str) -> None:
    ref = "RIS000101" if kind == "hl7" else UID
    assert readable(kind, ref if kind != "retention" else "", text, station) == shown


def test_the_board_s_day_and_times_are_its_zone_s() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    late_evening_utc = datetime(2026, 12, 5, 23, 30, tzinfo=ZoneInfo("UTC"))
    assert today(berlin, late_evening_utc).isoformat() == "2026-12-06"  # already tomorrow in Berlin
    assert today(ZoneInfo("America/New_York"), late_evening_utc).isoformat() == "2026-12-05"
    appointment = scheduled(datetime(2026, 12, 5, 9, 30), berlin)
    assert appointment is not None and appointment.isoformat() == "2026-12-05T09:30:00+01:00"
    event = recorded(datetime(2026, 12, 5, 9, 30), berlin)  # the host's clock, converted
    assert event is not None and event.utcoffset() == berlin.utcoffset(event.replace(tzinfo=None))
    assert scheduled(None, berlin) is None and recorded(None, berlin) is None
    assert board_zone("Asia/Tokyo").key == "Asia/Tokyo"
    assert board_zone("").key == host_zone_name()


def test_host_zone_from_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Lisbon")
    assert host_zone_name() == "Europe/Lisbon"
    monkeypatch.setenv("TZ", "Not/AZone")
    assert host_zone_name() != "Not/AZone"
