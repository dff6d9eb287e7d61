"""DICOMweb on the broker's HTTP server (PS3.18): the Worklist Service (UPS-RS, chapter 11) with its
WebSocket subscription channel, and the Modality Worklist as QIDO-style searches (``/dicomweb/mwlitems``).

The routes are thin: they turn DICOM JSON and query parameters into the datasets the DIMSE services
take, call the same domain services (:class:`broker.ups.service.UpsService`,
:class:`broker.mwl.finder.WorklistFinder`), and turn their outcomes into HTTP statuses.
"""
