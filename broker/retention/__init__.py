"""Retention: what leaves the database, and when, so that a department's database stops growing.

``apply_retention`` (:mod:`broker.retention.passes`) is one pass over every category, in bounded
batches; the periodic job of ``broker run`` and ``broker db purge`` call it. ``backup`` copies a running
database consistently.
"""

from broker.retention.passes import apply_retention
from broker.retention.policy import RetentionReport

__all__ = ["RetentionReport", "apply_retention"]
