"""Instance Availability Notification SCP (PS3.4 annex R): the N-CREATE handler.

Correlation (Study Instance UID, MPPS UID) and effects are :class:`~broker.ian.service.IanService`'s.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.dicom.association import Request, Response
from broker.dicom.statuses import answer_n_create
from broker.ian.service import IanService


def handle_n_create(request: Request, ian: IanService) -> Iterator[Response]:
    """N-CREATE: the archive says which instances of a study are available, and where."""
    yield from answer_n_create(request, lambda uid, dataset, calling_ae: ian.create(uid, dataset, calling_ae,
                                                                                    request.peer.address))
