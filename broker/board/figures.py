"""Today's figures per modality: done / to do, median waiting time and the turnaround medians.

Waiting time is from the later of the scheduled start and the order's arrival to the start (a
procedure started early waited 0): how long the department kept a patient waiting beyond the
appointment. The turnarounds are order -> start, start -> complete and complete -> images available.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from broker.board.rules import ProcedureFacts

DONE = frozenset({"COMPLETED", "IMAGES AVAILABLE", "ARCHIVED", "COMMIT FAILED"})
CLOSED = frozenset({"DISCONTINUED", "CANCELED"})
"""Neither done nor still to do."""


def waiting_seconds(p: ProcedureFacts) -> float | None:
    """How long past its appointment (or its order, if ordered later) the procedure started; None when
    it has not started or has no appointment."""
    if p.started_at is None or p.scheduled_start is None:
        return None
    ready = max(p.scheduled_start, p.ordered_at) if p.ordered_at is not None else p.scheduled_start
    return max(0.0, (p.started_at - ready).total_seconds())


def _span(begin: datetime | None, end: datetime | None) -> float | None:
    return (end - begin).total_seconds() if begin is not None and end is not None else None


def _median(values: Iterable[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    return {"count": len(known), "median_seconds": statistics.median(known) if known else None,
            "mean_seconds": statistics.fmean(known) if known else None}


def modality_figures(procedures: Iterable[ProcedureFacts]) -> dict[str, dict[str, Any]]:
    """Per modality (sorted): ``done``, ``to_do``, ``closed``, ``waiting`` and the three turnarounds, each
    ``{count, median_seconds, mean_seconds}``."""
    by_modality: dict[str, list[ProcedureFacts]] = {}
    for p in procedures:
        by_modality.setdefault(p.modality or "", []).append(p)
    figures: dict[str, dict[str, Any]] = {}
    for modality in sorted(by_modality):
        group = by_modality[modality]
        figures[modality] = {
            "done": sum(p.state in DONE for p in group),
            "to_do": sum(p.state not in DONE and p.state not in CLOSED for p in group),
            "closed": sum(p.state in CLOSED for p in group),
            "waiting": _median(waiting_seconds(p) for p in group),
            "order_to_start": _median(_span(p.ordered_at, p.started_at) for p in group),
            "start_to_complete": _median(_span(p.started_at, p.completed_at) for p in group),
            "complete_to_images": _median(_span(p.completed_at, p.images_at) for p in group),
        }
    return figures
