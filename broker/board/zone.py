"""The board's time zone (setting ``timezone``): its "today" and the zone every time it shows is in.

Two kinds of stored times meet on the board. Scheduled starts come from the RIS as wall-clock times
without a zone: they are taken as times of the board's zone (the department's). Event times (order
received, transitions, MPPS) are the host's clock (``datetime.now()``, naive): they are converted from
the host's zone. With the default (the host's zone) both are the same.
"""

from __future__ import annotations

import os
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

ZONEINFO_DIRS = ("/usr/share/zoneinfo/", "/usr/lib/zoneinfo/", "/usr/share/lib/zoneinfo/")


def host_zone_name() -> str:
    """The IANA name of the host's zone: ``TZ``, else the target of ``/etc/localtime``, else
    ``/etc/timezone``, else UTC (the browser must be told a name, not only an offset)."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    localtime = Path("/etc/localtime")
    if localtime.is_symlink():
        target = str(localtime.resolve())
        candidates += [target[len(prefix):] for prefix in ZONEINFO_DIRS if target.startswith(prefix)]
    timezone_file = Path("/etc/timezone")
    if timezone_file.is_file():
        candidates.append(timezone_file.read_text(encoding="utf-8").strip())
    for name in candidates:
        if name and _is_zone(name):
            return name
    return "UTC"


def _is_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def board_zone(setting: str) -> ZoneInfo:
    """The zone of the ``timezone`` setting (validated at start-up); empty = the host's."""
    return ZoneInfo(setting or host_zone_name())


def today(zone: ZoneInfo, now: datetime | None = None) -> date:
    """The board's day: the date in ``zone`` (not the browser's, not the host's)."""
    return (now or datetime.now(zone)).astimezone(zone).date()


def scheduled(naive: datetime | None, zone: ZoneInfo) -> datetime | None:
    """A scheduled start (the RIS's wall-clock time) as an aware time of the board's zone."""
    return naive.replace(tzinfo=zone) if naive is not None else None


def recorded(naive: datetime | None, zone: ZoneInfo) -> datetime | None:
    """An event time of the host's clock (naive local) as an aware time of the board's zone."""
    return naive.astimezone(zone) if naive is not None else None
