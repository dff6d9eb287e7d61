"""The DICOM workflow services (MPPS, IAN, Storage Commitment): outcomes, shared context, wiring.

The DICOM edge builds one :class:`broker.dicom.workflow.Workflow` per process and calls its services.
"""
