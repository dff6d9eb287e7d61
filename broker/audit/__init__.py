"""The audit trail (IHE ATNA): DICOM audit messages (PS3.15 A.5) of who did what to which patient's data.

:mod:`broker.audit.events` builds the events; :mod:`broker.audit.trail` records them (in the caller's
transaction, or batched for reads); the records are delivered to the Audit Record Repository over
syslog and kept in the database for ``audit_retention_days``.
"""
