"""The Modality Worklist (PS3.4 Annex K) as a domain layer: C-FIND identifier in, response datasets out.

Nothing here knows sockets or pynetdicom. The DICOM edge (``broker/dicom``) hands a decoded identifier
to :class:`~broker.mwl.finder.WorklistFinder` and turns the outcome into DIMSE statuses:

- :mod:`broker.mwl.identifier` reads the identifier into a :class:`~broker.mwl.identifier.WorklistQuery`
  (match conditions, requested return keys, unsupported keys) or raises
  :class:`~broker.mwl.identifier.IdentifierError` with the status and Error Comment to answer;
- :mod:`broker.mwl.matching` turns the query into one SQL SELECT on ``scheduled_steps``, read in keyset pages;
- :mod:`broker.mwl.responses` builds each response from the stored item (DICOM JSON);
- :mod:`broker.mwl.finder` ties them together lazily, so a broad query never sits in memory whole.
"""
