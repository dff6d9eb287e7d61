"""The board's delay rules and day figures on a fixed clock: when each flag rises, what it says, and
when the next one is due."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from broker.board.figures import modality_figures, waiting_seconds
from broker.board.rules import ProcedureFacts, Rules, counts, flag_of, flags, next_flag_at

ZONE = ZoneInfo("Europe/Berlin")
NINE = datetime(2026, 12, 5, 9, 0, tzinfo=ZONE)
RULES = Rules.from_minutes(15, {"CT": 30, "*": 45}, 30)


def at(minutes: float) -> datetime:
    return NINE + timedelta(minutes=minutes)


def test_a_waiting_procedure_is_late_once_its_start_has_passed_by_the_threshold() -> None:
    waiting = ProcedureFacts(1, "CT", "SCHEDULED", ordered_at=at(-60), scheduled_start=NINE)
    assert flag_of(waiting, at(14.9), RULES) is None
    flag = flag_of(waiting, at(23), RULES)
    assert flag is not None and flag.rule == "not_started"
    assert flag.label == "Late: not started, due 09:00 (+23 min)"
    assert flag.since == at(15) and flag.overdue_minutes == 8
    arrived = ProcedureFacts(2, "CT", "ARRIVED", scheduled_start=NINE)
    assert flag_of(arrived, at(16), RULES) is not None
    started = ProcedureFacts(3, "CT", "STARTED", scheduled_start=NINE, started_at=at(20))
    assert flag_of(started, at(40), RULES) is None  # started: no longer late (not yet overrunning)


def test_an_examination_overruns_its_modality_s_expected_duration() -> None:
    ct = ProcedureFacts(1, "CT", "STARTED", scheduled_start=NINE, started_at=at(5))
    assert flag_of(ct, at(34), RULES) is None
    flag = flag_of(ct, at(52), RULES)
    assert flag is not None and flag.rule == "overrunning"
    assert flag.label == "Overrunning: in progress 47 min (expected 30)"
    mr = ProcedureFacts(2, "MR", "STARTED", scheduled_start=NINE, started_at=at(5))  # the * entry: 45 min
    assert flag_of(mr, at(49), RULES) is None and flag_of(mr, at(51), RULES) is not None
    no_default = Rules.from_minutes(15, {"CT": 30}, 30)
    assert flag_of(mr, at(500), no_default) is None  # no expected duration: never overrunning


def test_completed_without_images_is_flagged_until_an_ian_or_commitment_arrives() -> None:
    done = ProcedureFacts(1, "CT", "COMPLETED", started_at=at(0), completed_at=at(20))
    flag = flag_of(done, at(55), RULES)
    assert flag is not None and flag.rule == "images_missing"
    assert flag.label == "Images missing: 35 min after completion"
    failed = ProcedureFacts(2, "CT", "COMMIT FAILED", completed_at=at(20))
    assert flag_of(failed, at(51), RULES) is not None
    available = ProcedureFacts(3, "CT", "IMAGES AVAILABLE", completed_at=at(20), images_at=at(25))
    assert flag_of(available, at(500), RULES) is None
    for closed in ("CANCELED", "DISCONTINUED", "ARCHIVED"):
        closed_facts = ProcedureFacts(4, "CT", closed, scheduled_start=NINE, completed_at=at(1))
        assert flag_of(closed_facts, at(500), RULES) is None


def test_flags_sorted_longest_overdue_first_counted_per_rule() -> None:
    procedures = [ProcedureFacts(1, "CT", "SCHEDULED", scheduled_start=at(30)),
                  ProcedureFacts(2, "CT", "SCHEDULED", scheduled_start=NINE),
                  ProcedureFacts(3, "MR", "STARTED", started_at=NINE),
                  ProcedureFacts(4, "CT", "COMPLETED", completed_at=at(10))]
    found = flags(procedures, at(60), RULES)
    assert [f.procedure_id for f in found] == [2, 4, 1, 3]  # due 09:15, 09:40, 09:45, 09:45
    assert counts(found) == {"not_started": 2, "overrunning": 1, "images_missing": 1}
    assert counts([]) == {"not_started": 0, "overrunning": 0, "images_missing": 0}


def test_next_flag_is_the_earliest_deadline_still_ahead() -> None:
    procedures = [ProcedureFacts(1, "CT", "SCHEDULED", scheduled_start=NINE),       # fires 09:15
                  ProcedureFacts(2, "CT", "STARTED", started_at=at(-10)),           # fires 09:20
                  ProcedureFacts(3, "CT", "IMAGES AVAILABLE", completed_at=NINE, images_at=NINE)]
    assert next_flag_at(procedures, at(0), RULES) == at(15)
    assert next_flag_at(procedures, at(16), RULES) == at(20)  # the first has fired: the next one
    assert next_flag_at(procedures, at(21), RULES) is None


def test_waiting_time_counts_from_the_appointment_or_a_later_order() -> None:
    assert waiting_seconds(ProcedureFacts(1, "CT", "STARTED", ordered_at=at(-60), scheduled_start=NINE,
                                          started_at=at(12))) == 720
    # ordered after its appointment time (a walk-in): waiting counts from the order
    assert waiting_seconds(ProcedureFacts(2, "CT", "STARTED", ordered_at=at(30), scheduled_start=NINE,
                                          started_at=at(40))) == 600
    assert waiting_seconds(ProcedureFacts(3, "CT", "STARTED", scheduled_start=NINE, started_at=at(-5))) == 0
    assert waiting_seconds(ProcedureFacts(4, "CT", "SCHEDULED", scheduled_start=NINE)) is None


def test_figures_per_modality() -> None:
    procedures = [
        ProcedureFacts(1, "CT", "IMAGES AVAILABLE", ordered_at=at(-60), scheduled_start=NINE, started_at=at(10),
                       completed_at=at(30), images_at=at(35)),
        ProcedureFacts(2, "CT", "STARTED", ordered_at=at(-60), scheduled_start=at(30), started_at=at(50)),
        ProcedureFacts(3, "CT", "SCHEDULED", scheduled_start=at(60)),
        ProcedureFacts(4, "CT", "CANCELED", scheduled_start=at(90)),
        ProcedureFacts(5, "MR", "COMPLETED", ordered_at=at(-60), scheduled_start=NINE, started_at=NINE,
                       completed_at=at(40)),
    ]
    figures = modality_figures(procedures)
    assert list(figures) == ["CT", "MR"]
    ct = figures["CT"]
    assert (ct["done"], ct["to_do"], ct["closed"]) == (1, 2, 1)
    assert ct["waiting"] == {"count": 2, "median_seconds": 900.0, "mean_seconds": 900.0}  # 10 and 20 minutes
    assert ct["start_to_complete"] == {"count": 1, "median_seconds": 1200.0, "mean_seconds": 1200.0}
    assert ct["complete_to_images"]["median_seconds"] == 300.0
    assert figures["MR"]["done"] == 1 and figures["MR"]["complete_to_images"]["median_seconds"] is None
