"""The retention cut-off: a record exactly ``audit_retention_days`` old is kept, an older one is not."""

from __future__ import annotations

from datetime import datetime, timedelta

from broker.audit.shipper import retention_cutoff


def test_cutoff_is_the_retention_before_now() -> None:
    now = datetime(2026, 12, 4, 12, 0)
    cutoff = retention_cutoff(180, now)
    assert cutoff == datetime(2026, 6, 7, 12, 0)
    kept, dropped = now - timedelta(days=180), now - timedelta(days=180, microseconds=1)
    assert not kept < cutoff
    assert dropped < cutoff
