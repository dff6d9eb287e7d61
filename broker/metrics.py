"""Prometheus metrics: HL7 messages by type and outcome, C-FIND latency, and, computed at scrape time
from the database, outbox queue depth, failed events and UPS subscriptions, plus the gauges a layer
above registers with :func:`add_scrape_source` (the status board's delays).

The counters and the histogram are incremented by the HL7 listener and the worklist SCP in the process
that runs them. ``/metrics`` serves the process it runs in: with ``broker run`` that is the main
process, so messages handled by ``BROKER_DICOM_PROCESSES`` extra acceptor processes are not counted
(HL7 is counted in the main process's listener even with ``BROKER_HL7_PROCESSES``). Metrics are a
concern of every part, so this module sits below them all (it needs only prometheus_client and the
tables): the protocol edges import it without loading the web stack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.core import REGISTRY, CollectorRegistry, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, inspect, select, table

from broker.store.tables import OutboxEvent, table_of

log = structlog.get_logger(__name__)

HL7_MESSAGES = Counter("broker_hl7_messages", "HL7 messages answered, by message type and outcome "
                       "(AA, AE, AR, CA, CE, CR, or none when no answer could be given)", ["message_type", "outcome"])
CFIND_SECONDS = Histogram("broker_mwl_cfind_seconds", "Modality Worklist C-FIND: seconds from the identifier "
                          "to the final response", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


def count_hl7_message(raw: bytes, replies: list[bytes] | None) -> None:
    """Count one message the listener answered (``replies``; None = it could not answer)."""
    try:
        count_hl7_labels(*hl7_message_labels(raw, replies))
    except Exception:  # a metric must never break the answer
        log.debug("metrics.hl7_count_failed", exc_info=True)


def hl7_message_labels(raw: bytes, replies: list[bytes] | None) -> tuple[str, str]:
    """The (message type, outcome) labels :func:`count_hl7_message` counts a message under.

    Separate so that an HL7 intake process (``BROKER_HL7_PROCESSES``) can extract them where the message
    is and send only the two short strings to the main process, whose ``/metrics`` counts them.
    """
    outcome = "none"
    if replies:
        reply = replies[-1]
        at = reply.find(b"MSA")
        if at >= 0:
            outcome = reply[at + 4:at + 6].decode("ascii", errors="replace").strip("|") or "none"
    return _message_type(raw), outcome


def count_hl7_labels(message_type: str, outcome: str) -> None:
    """Count one message from labels already extracted by :func:`hl7_message_labels` (in another process)."""
    try:
        HL7_MESSAGES.labels(message_type, outcome).inc()
    except Exception:  # a metric must never break the answer
        log.debug("metrics.hl7_count_failed", exc_info=True)


def _message_type(raw: bytes) -> str:
    start = raw.find(b"MSH")
    if start < 0 or len(raw) < start + 4:
        return "unknown"
    separator = raw[start + 3:start + 4]
    end = min((i for i in (raw.find(b"\r", start), raw.find(b"\n", start)) if i >= 0), default=len(raw))
    fields = raw[start:end].split(separator, 9)
    if len(fields) < 9:
        return "unknown"
    parts = fields[8].split(raw[start + 4:start + 5] or b"^")
    return "^".join(p.decode("ascii", errors="replace") for p in parts[:2])[:20] or "unknown"


class DatabaseCollector(Collector):
    """Gauges read from the database at each scrape: outbox rows by status, UPS subscriptions."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        outbox = table_of(OutboxEvent)
        depth = GaugeMetricFamily("broker_outbox_events", "Outbox events by status (pending = queue depth, "
                                  "failed = given up after every attempt)", labels=["status"])
        subscriptions = GaugeMetricFamily("broker_ups_subscriptions", "UPS subscriptions (rows of ups_subscriptions)")
        up = GaugeMetricFamily("broker_database_up", "1 when the database answered this scrape")
        try:
            with self.engine.connect() as db:
                counts = dict(db.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all())
                has_subscriptions = inspect(db).has_table("ups_subscriptions")
                subscribed = (db.execute(select(func.count()).select_from(table("ups_subscriptions"))).scalar_one()
                              if has_subscriptions else 0)
        except Exception as exc:
            log.warning("metrics.database_unavailable", error=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        for status in ("pending", "running", "done", "failed"):
            depth.add_metric([status], int(counts.get(status, 0)))
        subscriptions.add_metric([], int(subscribed))
        up.add_metric([], 1)
        yield depth
        yield subscriptions
        yield up


ScrapeSource = Callable[[], Iterable[GaugeMetricFamily]]
_SOURCES: dict[int, list[ScrapeSource]] = {}


def add_scrape_source(engine: Any, source: ScrapeSource) -> Callable[[], None]:
    """Have ``/metrics`` on ``engine`` also read the gauges of ``source`` at each scrape (a layer above
    this one, e.g. the board's delay gauges, registers itself without this module importing it).
    Returns the function that removes it again."""
    _SOURCES.setdefault(id(engine), []).append(source)

    def remove() -> None:
        sources = _SOURCES.get(id(engine), [])
        if source in sources:
            sources.remove(source)
        if not sources:
            _SOURCES.pop(id(engine), None)

    return remove


class _SourcesCollector(Collector):
    def __init__(self, sources: list[ScrapeSource]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for source in self.sources:
            try:
                yield from source()
            except Exception as exc:  # one source's trouble leaves the others' figures
                log.warning("metrics.source_failed", error=type(exc).__name__)


def exposition(engine: Any) -> tuple[bytes, str]:
    """The text exposition of the process's metrics plus the database gauges, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(engine))
    if _SOURCES.get(id(engine)):
        registry.register(_SourcesCollector(list(_SOURCES[id(engine)])))
    return generate_latest(REGISTRY) + generate_latest(registry), CONTENT_TYPE_LATEST
