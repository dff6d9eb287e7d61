"""DICOM peers for the procedure status pipeline tests, all real pynetdicom AEs on 127.0.0.1: a
Storage Commitment SCP "archive" (reporting on the request's association, on a new one, with
failures, or never), an MPPS SCP forward target, and the broker's own pieces started on free ports."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Self

from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
)

from broker.config import Settings
from broker.dicom.server import DicomServer
from broker.dicom.workflow import Workflow
from broker.store.session import make_engine
from tests.ports import free_port

STGCMT_INSTANCE = "1.2.840.10008.1.20.1.1"



def wait_until(condition: Callable[[], object], seconds: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {seconds} s")


@contextmanager
def dicom_server(settings: Settings, database_url: str, workflow: Workflow) -> Iterator[DicomServer]:
    """The broker's DICOM server (its own reading engine) with the workflow services, on ``settings``' port."""
    reader = make_engine(database_url, for_reading=True)
    server = DicomServer(settings, reader, workflow=workflow)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        reader.dispose()


def report_dataset(transaction_uid: str, committed: list[tuple[str, str]],
                   failed: list[tuple[str, str, int]] | None = None) -> tuple[int, Dataset]:
    """(Event Type ID, Event Information) of a commitment result (PS3.4 J.3.3)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.RetrieveAETitle = "ARCHIVE"
    ds.ReferencedSOPSequence = [_ref(c, i) for c, i in committed]
    if failed:
        items = []
        for sop_class, sop_instance, reason in failed:
            item = _ref(sop_class, sop_instance)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return (2 if failed else 1), ds


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


@dataclass
class ActionSeen:
    """One N-ACTION as the archive received it."""

    action_type: int | None
    requested_instance: str
    transaction_uid: str
    referenced: list[tuple[str, str]]
    calling_ae: str
    association: Any


class _Peer:
    """What the pynetdicom SCPs below share: ``ae`` listening on 127.0.0.1:``port`` with the handlers of
    :meth:`_handlers` from :meth:`start` to :meth:`stop`, named ``peer_setting()`` in the broker's
    ``dicom_peers``."""

    ae: AE
    ae_title: str
    port: int
    _server: Any

    def _handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        raise NotImplementedError

    def start(self) -> Self:
        self._server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=self._handlers())
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def peer_setting(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"


@dataclass
class StgCmtArchive(_Peer):
    """A Storage Commitment Push Model SCP. ``mode``:

    - ``same``: reports every request on the request's association, right after the N-ACTION response;
    - ``new``: answers the N-ACTION only; the test calls :meth:`report_on_new_association`;
    - ``silent``: answers the N-ACTION and never reports.

    ``fail`` maps a SOP Instance UID to the Failure Reason reported for it; ``action_statuses`` are
    the N-ACTION statuses answered first (then 0x0000)."""

    mode: str = "same"
    ae_title: str = "ARCHIVE"
    fail: dict[str, int] = field(default_factory=dict)
    action_statuses: list[int] = field(default_factory=list)
    port: int = 0
    actions: list[ActionSeen] = field(default_factory=list)
    report_statuses: list[tuple[str, int]] = field(default_factory=list)  # (association kind, status)
    released: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.ae = AE(ae_title=self.ae_title)
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.ae.add_requested_context(StorageCommitmentPushModel)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 10
        self._server: Any = None
        self._lock = threading.Lock()

    def _handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_N_ACTION, self._on_action), (evt.EVT_DIMSE_SENT, self._on_sent),
                (evt.EVT_RELEASED, self._on_released)]

    # --- the archive's side ----------------------------------------------------------------------------
    def _on_action(self, event: Any) -> tuple[int, None]:
        info = event.action_information
        seen = ActionSeen(event.action_type, str(event.request.RequestedSOPInstanceUID),
                          str(info.TransactionUID),
                          [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                           for i in info.ReferencedSOPSequence],
                          event.assoc.requestor.ae_title, event.assoc)
        with self._lock:
            self.actions.append(seen)
            status = self.action_statuses.pop(0) if self.action_statuses else 0x0000
        return status, None

    def _on_sent(self, event: Any) -> None:
        # The N-ACTION response is on its way: now the report may follow on the same association
        # (sent from another thread; the association's own thread is busy with this very response).
        if type(event.message).__name__ != "N_ACTION_RSP" or self.mode != "same":
            return
        if int(event.message.command_set.Status) != 0x0000:
            return
        seen = self.actions[-1]
        threading.Thread(target=self._report_same, args=(event.assoc, seen), daemon=True).start()

    def result_of(self, seen: ActionSeen) -> tuple[int, Dataset]:
        committed = [(c, i) for c, i in seen.referenced if i not in self.fail]
        failed = [(c, i, self.fail[i]) for c, i in seen.referenced if i in self.fail]
        return report_dataset(seen.transaction_uid, committed, failed)

    def _report_same(self, assoc: Any, seen: ActionSeen) -> None:
        event_type, info = self.result_of(seen)
        status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel, STGCMT_INSTANCE)
        self.report_statuses.append(("same", int(status.Status) if status else -1))

    def _on_released(self, event: Any) -> None:
        self.released.append(event.assoc)

    def report_on_new_association(self, broker_port: int, broker_ae: str, seen: ActionSeen) -> int:
        """Open an association to the broker taking the SCP role of the class (role selection
        SCU=0, SCP=1) and send the result; returns the broker's status."""
        event_type, info = self.result_of(seen)
        return self.send_report(broker_port, broker_ae, event_type, info)

    def send_report(self, broker_port: int, broker_ae: str, event_type: int, info: Dataset) -> int:
        assoc = self.ae.associate("127.0.0.1", broker_port, ae_title=broker_ae,
                                  ext_neg=[build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)])
        assert assoc.is_established, "the broker refused the archive's association"
        try:
            status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel, STGCMT_INSTANCE)
        finally:
            assoc.release()
        code = int(status.Status) if status else -1
        self.report_statuses.append(("new", code))
        return code


@dataclass
class MppsPeer(_Peer):
    """An MPPS SCP that records every N-CREATE / N-SET it receives, in order."""

    ae_title: str = "MPPSFWD"
    port: int = 0
    received: list[tuple[str, str, Dataset]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.ae = AE(ae_title=self.ae_title)
        self.ae.add_supported_context(ModalityPerformedProcedureStep)
        self._server: Any = None

    def _handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_N_CREATE, self._on_create), (evt.EVT_N_SET, self._on_set)]

    def _on_create(self, event: Any) -> tuple[int, Dataset]:
        ds = event.attribute_list
        self.received.append(("N-CREATE", str(event.request.AffectedSOPInstanceUID), ds))
        return 0x0000, ds

    def _on_set(self, event: Any) -> tuple[int, Dataset]:
        ds = event.modification_list
        self.received.append(("N-SET", str(event.request.RequestedSOPInstanceUID), ds))
        return 0x0000, ds

