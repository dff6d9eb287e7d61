"""DICOMweb searches: UPS-RS Search (``GET /dicomweb/workitems``, PS3.18 11.9) and the Modality
Worklist as a QIDO-style search (``GET /dicomweb/mwlitems``).

Both turn the query parameters into the C-FIND identifier a modality would send (:mod:`.qido`) and
ask the service the DIMSE edge asks: :class:`~broker.mwl.finder.WorklistFinder` (with the matching
options of the DICOM AE, :func:`broker.dicom.server.worklist_options`) and
:meth:`broker.ups.service.UpsService.find`. So an HTTP search returns the items and attributes a
C-FIND with the same keys returns, by construction. The station-only option
(``mwl_station_sees_own_items``) does not apply: an HTTP caller is a token, not a station.

Answers (PS3.18 8.3.4.4, 8.4): 200 with a DICOM JSON array; 204 when nothing matches (or ``offset``
skips every match); 400 with the reason (Warning header and ``detail``) for a parameter or key that
cannot be used; 406 when the client accepts no DICOM JSON; 503 when the database cannot be read.
At most :data:`MAX_RESULTS` results per answer; when more match than are returned (cut by ``limit`` or
by the maximum) the answer carries ``Warning: 299 <host>: "The number of results exceeded the maximum
supported by the server. Additional results can be requested."``. Keys the worklist cannot match on
are ignored for matching and returned, as C-FIND does (FF01 there), and named in a Warning here.

Each answer is a Query in the audit trail (:mod:`broker.web.access_audit`), naming the patients
returned.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from broker.dicom.server import worklist_options
from broker.dicom_json import JsonDataset, value
from broker.domain.ups_matching import UnsupportedKey
from broker.mwl.finder import WorklistFinder
from broker.mwl.identifier import IdentifierError
from broker.ups.service import UpsService
from broker.web.access_audit import note_patients, patient_ref
from broker.web.auth import ReadAccess
from broker.web.dicomweb import qido
from broker.web.dicomweb.media import DICOM_JSON, DicomJSONResponse

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

MAX_RESULTS = 1000
"""The most results one answer holds (PS3.18 "maxResults"); page further with ``offset``."""
MORE_RESULTS = ("The number of results exceeded the maximum supported by the server. "
                "Additional results can be requested.")
_ACCEPTABLE = ("application/dicom+json", "application/json", "application/*", "*/*")
_SEARCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the matches, a DICOM JSON array", "content": {DICOM_JSON: {}}},
    204: {"description": "no match"},
    400: {"description": "a query parameter or key cannot be used: the Warning header and detail say why"},
    401: {"description": "no known API token"}, 403: {"description": "the token's role is not enough"},
    406: {"description": "the Accept header allows no DICOM JSON"},
    503: {"description": "the database cannot be read now; retry"},
}


@dataclass(frozen=True)
class Page:
    """One answer's results and what the client should be told about them."""

    results: list[JsonDataset]
    more: bool  # matches remain after these
    warnings: tuple[str, ...]


class SearchRefused(Exception):
    """The search cannot be run as asked: HTTP ``status`` with ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_PARAMETERS = (
    "Query parameters (PS3.18 8.3.4): `{attribute}={value}` matches, the attribute by keyword or tag, inside a "
    "sequence by a dotted path (`ScheduledProcedureStepSequence.Modality=CT`), the value as in C-FIND (`*` `?` "
    "wildcards, `a-b` ranges, a comma-separated UID list); an empty value asks for the attribute back. "
    "`includefield` (repeatable, comma-separated, or `all`), `limit` (1 or more), `offset`; `fuzzymatching`, "
    "`emptyvaluematching`, `multiplevaluematching` are ignored with a Warning. At most "
    f"{MAX_RESULTS} results per answer; a Warning says when more match.")


@router.get("/mwlitems", summary="Search the Modality Worklist (QIDO-RS parameters; answers as C-FIND does)",
            description=_PARAMETERS, response_class=DicomJSONResponse, responses=_SEARCH_RESPONSES)
async def search_mwl_items(request: Request, caller: ReadAccess) -> Response:
    return await _search(request, caller.label, qido.MWL, _mwl_page)


@router.get("/workitems", summary="UPS-RS Search Transaction (PS3.18 11.9)",
            description=_PARAMETERS, response_class=DicomJSONResponse, responses=_SEARCH_RESPONSES)
async def search_workitems(request: Request, caller: ReadAccess) -> Response:
    return await _search(request, caller.label, qido.UPS, _ups_page)


async def _search(request: Request, caller: str, model: qido.SearchModel, run: Any) -> Response:
    if not _accepts_dicom_json(request.headers.get("accept", "")):
        return _refusal(request, 406, "only application/dicom+json is offered")
    try:
        query = qido.parse_search(request.query_params.multi_items(), model)
        page: Page = await asyncio.to_thread(run, request, query, caller)
    except qido.QidoError as exc:
        return _refusal(request, 400, str(exc))
    except SearchRefused as exc:
        return _refusal(request, exc.status, exc.reason)
    note_patients(request, _patients(page.results))
    log.info("dicomweb.search", resource=model.name, caller=caller, returned=len(page.results), more=page.more,
             offset=query.offset, limit=query.limit)
    warnings = [*query.warnings, *page.warnings] + ([MORE_RESULTS] if page.more else [])
    response: Response = DicomJSONResponse(page.results) if page.results else Response(status_code=204)
    response.headers["Cache-Control"] = "no-store"
    for text in warnings:
        response.headers.append("Warning", _warning(request, text))
    return response


def _window(stream: Iterator[JsonDataset], query: qido.QidoQuery) -> tuple[list[JsonDataset], bool]:
    """The results after ``offset``, at most ``limit`` (and :data:`MAX_RESULTS`), and whether more match;
    reads one match past the page to know, and no further."""
    size = min(query.limit or MAX_RESULTS, MAX_RESULTS)
    taken = list(islice(stream, query.offset, query.offset + size + 1))
    return taken[:size], len(taken) > size


# --- the Modality Worklist ---------------------------------------------------------------------------
def _mwl_page(request: Request, query: qido.QidoQuery, caller: str) -> Page:
    finder = _finder(request)
    try:
        result = finder.find(query.identifier, caller)
        results, more = _window(result.json_responses, query)
    except IdentifierError as exc:
        raise SearchRefused(400, exc.comment) from exc
    except SQLAlchemyError as exc:
        log.error("dicomweb.mwl_database_error", caller=caller, error=type(exc).__name__)
        raise SearchRefused(503, "worklist database unavailable; retry") from exc
    warnings: tuple[str, ...] = ()
    if result.unsupported_keys:
        warnings = (f"Matching on {', '.join(result.unsupported_keys)[:200]} is not supported; "
                    "ignored for matching and returned (as C-FIND answers FF01).",)
    return Page(results, more, warnings)


_made_lock = threading.Lock()


def _finder(request: Request) -> WorklistFinder:
    """The app's worklist finder on its reading engine, with the DICOM AE's matching options (made once)."""
    state = request.app.state
    with _made_lock:
        finder: WorklistFinder | None = getattr(state, "dicomweb_worklist_finder", None)
        if finder is None:
            finder = WorklistFinder(state.engine, worklist_options(state.settings))
            state.dicomweb_worklist_finder = finder
    return finder


# --- UPS ---------------------------------------------------------------------------------------------
def _ups_page(request: Request, query: qido.QidoQuery, caller: str) -> Page:
    ups = _ups_finder(request)
    try:
        results, more = _window((d.to_json_dict() for d in ups.find(query.identifier)), query)
    except UnsupportedKey as exc:
        raise SearchRefused(400, str(exc)) from exc
    except SQLAlchemyError as exc:
        log.error("dicomweb.ups_database_error", caller=caller, error=type(exc).__name__)
        raise SearchRefused(503, "database unavailable; retry") from exc
    return Page(results, more, ())


def _ups_finder(request: Request) -> UpsService:
    """A UPS service on the app's reading engine, for :meth:`UpsService.find` only (made once)."""
    state = request.app.state
    with _made_lock:
        ups: UpsService | None = getattr(state, "dicomweb_ups_finder", None)
        if ups is None:
            engine: Engine = state.engine
            ups = UpsService(engine)
            state.dicomweb_ups_finder = ups
    return ups


# --- answers -------------------------------------------------------------------------------------------
def _accepts_dicom_json(accept: str) -> bool:
    """Whether the Accept header allows DICOM JSON (none at all does)."""
    if not accept.strip():
        return True
    for entry in accept.split(","):
        media, _, parameters = entry.partition(";")
        if media.strip().lower() in _ACCEPTABLE and "q=0" not in parameters.replace(" ", "").split(";")[-1:]:
            return True
    return False


def _warning(request: Request, text: str) -> str:
    """A Warning header value (RFC 7234 5.5, as PS3.18 8.4.3 uses it): code 299, the service, the text."""
    return f'299 {request.url.netloc or "-"}: "{text.replace(chr(34), chr(39))}"'


def _refusal(request: Request, status: int, reason: str) -> Response:
    log.info("dicomweb.search_refused", path=request.url.path, status=status, reason=reason)
    return JSONResponse({"detail": reason}, status_code=status,
                        headers={"Warning": _warning(request, reason), "Cache-Control": "no-store"})


def _patients(results: Iterable[JsonDataset]) -> Iterator[str]:
    for result in results:
        patient_id = value(result, "PatientID")
        if patient_id:
            yield patient_ref(patient_id, value(result, "IssuerOfPatientID"))
