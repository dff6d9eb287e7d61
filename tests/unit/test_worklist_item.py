"""Index columns of a stored worklist item: the scheduled start built without strptime gives what
strptime gives, for well-formed values and for every odd one that falls back to it."""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest

from broker.domain.worklist_item import scheduled_start


def strptime_start(date: str, time: str) -> datetime | None:
    """scheduled_start as it was written before its fast path."""
    if len(date) != 8 or not date.isdigit():
        return None
    digits = (time.split(".")[0] + "000000")[:6] if time else "000000"
    try:
        return datetime.strptime(date + digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def test_well_formed_start() -> None:
    assert scheduled_start("20261123", "093000") == datetime(2026, 11, 23, 9, 30)
    assert scheduled_start("20261123", "0930") == datetime(2026, 11, 23, 9, 30)
    assert scheduled_start("20261123", "093000.123456") == datetime(2026, 11, 23, 9, 30)
    assert scheduled_start("20261123", "") == datetime(2026, 11, 23)


@pytest.mark.parametrize(("date", "time"), [
    ("20260230", "093000"),  # past the month's end
    ("00000101", "000000"),  # year 0
    ("20261301", "093000"),  # month 13: strptime's one-digit month and its leftovers decide
    ("20261100", "093000"), ("20261132", "093000"), ("20261123", "240000"), ("20261123", "236000"),
    ("20261123", "235960"), ("20261123", "9"), ("20261123", "x93000"), ("2026112x", "093000"),
    ("2026-11-2", "093000"), ("٢٠٢٦١١٢٣", "093000"), ("20261123", "٠٩٣٠٠٠"), ("20261123", "09 300"),
])
def test_odd_values_as_strptime_reads_them(date: str, time: str) -> None:
    assert scheduled_start(date, time) == strptime_start(date, time)


def test_every_month_day_hour_minute_second_boundary() -> None:
    for month, day, hour, minute, second in itertools.product(
            (0, 1, 2, 12, 13), (0, 1, 28, 29, 30, 31, 32), (0, 23, 24), (0, 59, 60), (0, 59, 60, 61)):
        date, time = f"2024{month:02d}{day:02d}", f"{hour:02d}{minute:02d}{second:02d}"
        assert scheduled_start(date, time) == strptime_start(date, time), (date, time)
