"""All DICOMweb routes under ``/dicomweb``, for :func:`broker.web.app.create_app` to include."""

from __future__ import annotations

from fastapi import APIRouter

from broker.web.dicomweb import search, subscriptions, workitems

router = APIRouter()
# the literal paths (/workitems/1.2.3/state, /subscribers/...) are matched before /workitems/{workitem}
for module in (subscriptions, workitems, search):
    router.include_router(module.router)
