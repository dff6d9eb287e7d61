"""The worklist C-FIND as one call: identifier in, a lazy stream of response datasets out.

The DICOM edge calls :meth:`WorklistFinder.find` from an association thread and iterates
:attr:`FindResult.responses`, sending one pending response per dataset; it may stop at any time
(C-CANCEL, aborted association). Reading is in keyset pages (:mod:`broker.mwl.matching`): each page is
one short statement on a connection that is returned to the pool before the first response of the page
is handed out, so a slow or cancelling modality holds no database connection or transaction, and
memory holds one page, not the whole match.

Pages are separate reads, so a change committed between two pages can show (an item rescheduled to
later than the page being read may be returned twice, one moved earlier missed); a worklist is a
snapshot of a moving schedule either way, and holding a transaction open for the pace of the slowest
modality would cost more.

Errors: :class:`~broker.mwl.identifier.IdentifierError` from :meth:`~WorklistFinder.find` (status and
Error Comment on the exception); database errors (``sqlalchemy.exc.SQLAlchemyError``) surface from the
iterator, on the read of the page that failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import orjson
import structlog
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Engine

from broker.dicom_json import JsonDataset
from broker.mwl.identifier import WorklistQuery, parse_identifier
from broker.mwl.matching import PageKey, WorklistOptions, match_conditions, may_have_undated, page_select
from broker.mwl.responses import dataset_from_json, response_json

__all__ = ["PENDING", "PENDING_UNSUPPORTED_KEYS", "FindResult", "WorklistFinder"]

log = structlog.get_logger(__name__)

PENDING = 0xFF00
PENDING_UNSUPPORTED_KEYS = 0xFF01


@dataclass(frozen=True)
class FindResult:
    """The outcome of a valid query: the pending status to use and the responses, read lazily.

    ``json_responses`` is the stream itself (DICOM JSON, which the DICOM edge encodes directly);
    :attr:`responses` is the same stream as pydicom datasets. Either can be read, once.
    """

    query: WorklistQuery
    json_responses: Iterator[JsonDataset]

    @property
    def responses(self) -> Iterator[Dataset]:
        """The responses as pydicom datasets."""
        return map(dataset_from_json, self.json_responses)

    @property
    def unsupported_keys(self) -> tuple[str, ...]:
        """Paths of the optional keys ignored for matching (empty: all keys supported); truthy = FF01."""
        return self.query.unsupported_keys

    @property
    def optional_keys_unsupported(self) -> bool:
        return self.query.optional_keys_unsupported

    @property
    def pending_status(self) -> int:
        """FF01 when an optional matching key was not supported, FF00 otherwise (PS3.4 K.4.1.1.4)."""
        return PENDING_UNSUPPORTED_KEYS if self.query.optional_keys_unsupported else PENDING


class WorklistFinder:
    """Answers worklist queries from ``scheduled_steps``; shared by all association threads (immutable)."""

    def __init__(self, engine: Engine, options: WorklistOptions | None = None) -> None:
        self.engine = engine
        self.options = options or WorklistOptions()

    def for_station(self, station_ae_title: str) -> WorklistFinder:
        """The same finder showing only the items scheduled on ``station_ae_title`` (the option
        "a station sees only its own items", applied per association with the calling AE title)."""
        return WorklistFinder(self.engine, replace(self.options, station_ae_title=station_ae_title.strip()))

    def find(self, identifier: Dataset, calling_ae_title: str) -> FindResult:
        """Parse ``identifier`` (raises :class:`~broker.mwl.identifier.IdentifierError`) and return the
        lazily read responses; nothing is read from the database until the first response is asked for."""
        query = parse_identifier(identifier)
        where = match_conditions(query, self.options, self.engine.dialect.name)
        log.debug("mwl.find", calling_ae=calling_ae_title, conditions=len(query.conditions),
                  unsupported_keys=list(query.unsupported_keys) or None,
                  station_only=self.options.station_ae_title)
        return FindResult(query, self._responses(query, where, calling_ae_title))

    def _responses(self, query: WorklistQuery, where: list[ColumnElement[bool]],
                   calling_ae_title: str) -> Iterator[JsonDataset]:
        started = time.perf_counter()
        count = pages = 0
        size = self.options.page_size
        phases = (True, False) if may_have_undated(query) else (True,)
        for dated in phases:
            after: PageKey | None = None
            while True:
                statement = page_select(where, after, size, dated=dated)
                with self.engine.connect() as connection:
                    rows = connection.execute(statement).all()
                pages += 1
                for row in rows:
                    count += 1
                    yield response_json(orjson.loads(row.item), query)
                if len(rows) < size:
                    break
                last = rows[-1]
                after = PageKey(last.scheduled_start, last.id)
        log.debug("mwl.read", calling_ae=calling_ae_title, matches=count, pages=pages,
                  ms=round((time.perf_counter() - started) * 1000, 2))
