"""Worklist folders: ``.wl`` files (the layout of DCMTK ``wlmscpfs`` and Orthanc's worklist plugin) as
scheduled steps, so that the broker can replace a file-based worklist server before any HL7 feed exists.

``reading`` turns one file's bytes into the records of a domain command (or a refusal), ``identity``
names the step a file stands for, ``intake`` applies a file (archive row, domain command, file state)
in the same way the HL7 intake applies an order, ``folders`` lists a folder and decides what changed,
``watcher`` follows folders in ``broker run`` (file events plus a periodic scan, on the node holding
the lease), and ``importer`` is ``broker import-worklist``.
"""
