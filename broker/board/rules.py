"""The delay rules of the status board: what is late, flagged with a rule name and a text label (never
colour alone), as pure functions of the procedures' facts and a clock.

* ``not_started``: a procedure waiting to start (SCHEDULED, ARRIVED) whose earliest scheduled start has
  passed by ``start_late`` (setting ``board_start_late_minutes``).
* ``overrunning``: a procedure in progress (STARTED) longer than its modality's expected duration
  (``board_expected_minutes``; ``*`` for the other modalities; no entry = no rule).
* ``images_missing``: a procedure completed (COMPLETED, or COMMIT FAILED) whose images were not reported
  available (IAN) or committed (Storage Commitment) ``images`` after its completion
  (``board_images_minutes``).

:func:`next_flag_at` says when the next flag will rise with no event at all (time passing is enough),
so that a live stream can wake up at that moment instead of polling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

WAITING = frozenset({"SCHEDULED", "ARRIVED"})
IN_PROGRESS = frozenset({"STARTED"})
AWAITING_IMAGES = frozenset({"COMPLETED", "COMMIT FAILED"})
RULES = ("not_started", "overrunning", "images_missing")
"""Every rule name, in the order the board lists them."""


@dataclass(frozen=True)
class ProcedureFacts:
    """What the rules look at for one procedure; every time aware (the board's zone)."""

    id: int
    modality: str
    state: str
    ordered_at: datetime | None = None
    scheduled_start: datetime | None = None
    """the earliest scheduled start among the steps not yet started (the first step's otherwise)"""
    started_at: datetime | None = None
    completed_at: datetime | None = None
    images_at: datetime | None = None


@dataclass(frozen=True)
class Rules:
    """The thresholds of the rules (from the ``board_*`` settings)."""

    start_late: timedelta
    expected: Mapping[str, timedelta]
    """modality -> expected duration; ``*``: every modality without an entry of its own"""
    images: timedelta

    @classmethod
    def from_minutes(cls, start_late: float, expected: Mapping[str, float], images: float) -> Rules:
        return cls(timedelta(minutes=start_late), {m: timedelta(minutes=v) for m, v in expected.items()},
                   timedelta(minutes=images))

    def expected_for(self, modality: str) -> timedelta | None:
        return self.expected.get(modality.upper(), self.expected.get("*"))


@dataclass(frozen=True)
class Flag:
    """One delay: which procedure, which rule, since when it holds and a label people read."""

    procedure_id: int
    modality: str
    rule: str
    label: str
    since: datetime
    overdue_minutes: int


def _deadline(p: ProcedureFacts, rules: Rules) -> tuple[str, datetime, datetime] | None:
    """(rule, the moment the rule fires, the moment its count starts) for a procedure in a state a rule
    watches, else None."""
    if p.state in WAITING and p.scheduled_start is not None:
        return "not_started", p.scheduled_start + rules.start_late, p.scheduled_start
    if p.state in IN_PROGRESS and p.started_at is not None:
        expected = rules.expected_for(p.modality)
        if expected is not None:
            return "overrunning", p.started_at + expected, p.started_at
    if p.state in AWAITING_IMAGES and p.completed_at is not None and p.images_at is None:
        return "images_missing", p.completed_at + rules.images, p.completed_at
    return None


def flag_of(p: ProcedureFacts, now: datetime, rules: Rules) -> Flag | None:
    """The procedure's flag at ``now``, if a rule holds (a procedure is in one state: one rule at most)."""
    found = _deadline(p, rules)
    if found is None or now < found[1]:
        return None
    rule, fires, counted_from = found
    minutes = int((now - counted_from).total_seconds() // 60)
    overdue = int((now - fires).total_seconds() // 60)
    if rule == "not_started":
        label = f"Late: not started, due {counted_from:%H:%M} (+{minutes} min)"
    elif rule == "overrunning":
        expected = rules.expected_for(p.modality) or timedelta()
        label = f"Overrunning: in progress {minutes} min (expected {int(expected.total_seconds() // 60)})"
    else:
        label = f"Images missing: {minutes} min after completion"
    return Flag(p.id, p.modality, rule, label, fires, overdue)


def flags(procedures: Iterable[ProcedureFacts], now: datetime, rules: Rules) -> list[Flag]:
    """Every flag at ``now``, longest overdue first."""
    found = [f for p in procedures if (f := flag_of(p, now, rules)) is not None]
    return sorted(found, key=lambda f: (f.since, f.procedure_id))


def next_flag_at(procedures: Iterable[ProcedureFacts], now: datetime, rules: Rules) -> datetime | None:
    """The earliest moment after ``now`` when a rule starts to hold for one of ``procedures`` if nothing
    else happens; None when no flag is due to rise."""
    upcoming = [d[1] for p in procedures if (d := _deadline(p, rules)) is not None and d[1] > now]
    return min(upcoming, default=None)


def counts(found: Iterable[Flag]) -> dict[str, int]:
    """Flags per rule, every rule named (0 when none)."""
    result = dict.fromkeys(RULES, 0)
    for f in found:
        result[f.rule] += 1
    return result
