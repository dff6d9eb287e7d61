"""The Modality Worklist C-FIND handler: identifier in, one pending response per matching step out.

The matching itself is ``broker.mwl`` (no sockets there); this handler only maps its outcome to
PS3.4 K.4.1.1.4 statuses and honours C-CANCEL between responses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import structlog
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from broker.dicom.association import Request
from broker.dicom.statuses import failure_dataset
from broker.dicom_json import JsonDataset
from broker.metrics import CFIND_SECONDS  # Prometheus; imports no web stack
from broker.mwl.finder import WorklistFinder
from broker.mwl.identifier import IdentifierError

log = structlog.get_logger(__name__)

SUCCESS = 0x0000
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
# C001: the query was valid but could not be run (database, bug); identifier errors use the status
# IdentifierError carries (A900 or C000).
UNABLE_TO_PROCESS = 0xC001

FindResponse = tuple[int | Dataset, Dataset | JsonDataset | None]


def handle_find(request: Request, finder: WorklistFinder) -> Iterator[FindResponse]:
    """C-FIND handler for Modality Worklist Information Model - FIND."""
    calling_ae_title = request.peer.calling_ae_title
    identifier = request.data_set()  # decoded and checked: an undecodable one got A900 without us
    started = time.perf_counter()
    count = 0
    try:
        result = finder.find(identifier, calling_ae_title)
        pending = result.pending_status
        for response in result.json_responses:
            if request.is_cancelled:
                log.info("mwl.cancelled", calling_ae=calling_ae_title, returned=count)
                yield CANCEL, None
                return
            count += 1
            yield pending, response
    except IdentifierError as exc:
        log.warning("mwl.invalid_query", calling_ae=calling_ae_title, error=str(exc))
        yield failure_dataset(exc.status, exc.comment, exc.offending), None
        return
    except MemoryError:
        log.error("mwl.out_of_resources", calling_ae=calling_ae_title)
        yield failure_dataset(OUT_OF_RESOURCES, "out of resources"), None
        return
    except SQLAlchemyError as exc:
        log.error("mwl.database_error", calling_ae=calling_ae_title, error=type(exc).__name__)
        yield failure_dataset(UNABLE_TO_PROCESS, "worklist database unavailable"), None
        return
    except Exception as exc:  # a bug must answer the modality, not hang it
        log.exception("mwl.internal_error", calling_ae=calling_ae_title)
        yield failure_dataset(UNABLE_TO_PROCESS, f"internal error ({type(exc).__name__})"), None
        return
    elapsed = time.perf_counter() - started
    CFIND_SECONDS.observe(elapsed)
    log.info("mwl.query", calling_ae=calling_ae_title, matches=count,
             unsupported_keys=list(result.unsupported_keys) or None,
             ms=round(elapsed * 1000, 2))
    yield SUCCESS, None
