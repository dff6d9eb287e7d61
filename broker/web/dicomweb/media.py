"""The DICOM JSON media type (PS3.18 F.2) and the response that carries it."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

DICOM_JSON = "application/dicom+json"


class DicomJSONResponse(Response):
    """A response of ``application/dicom+json``: a list of datasets (searches) or one dataset, as
    DICOM JSON (PS3.18 F.2), serialised by orjson."""

    media_type = DICOM_JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
