"""The DICOM network edge: the broker's application entity and its thin service handlers.

Handlers here decode nothing themselves and decide nothing: they pass the received dataset to the
domain layer (``broker.mwl`` for the worklist) and turn its answer into DIMSE statuses.
"""
