"""The HTTP side of the broker: REST API described by OpenAPI, health and metrics, and the
department status board. ``create_app`` in :mod:`broker.web.app` builds the FastAPI application;
:mod:`broker.web.server` runs it on uvicorn inside ``broker run`` or alone (``broker web``).

This package's ``__init__`` imports nothing, so that :mod:`broker.metrics` can be imported by the
HL7 and DICOM edges without loading FastAPI.
"""
