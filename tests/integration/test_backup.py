"""``broker db backup`` while an HL7 writer writes, ``broker db restore`` into a new database, and a broker
run on the restored database serves the same worklist to a C-FIND as the original."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from sqlalchemy import Engine, func, select

from broker.config import load_settings
from broker.dicom.server import DicomServer
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.store.session import make_engine
from broker.store.tables import Order, RequestedProcedure, ScheduledStep, table_of
from tests.conftest import _postgres_database
from tests.integration.test_cli import broker_run, env_for, run_cli
from tests.mwl_support import Order as HL7Order
from tests.mwl_support import place
from tests.ports import free_port

pytestmark = pytest.mark.integration
FUTURE = "20991231090000"


def worklist(port: int, station: str) -> list[tuple[str, ...]]:
    """The station's worklist as a modality asks for it (pynetdicom C-FIND), sorted."""
    identifier = Dataset()
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "RequestedProcedureID"):
        setattr(identifier, keyword, "")
    step = Dataset()
    step.ScheduledStationAETitle = station
    for keyword in ("ScheduledProcedureStepID", "Modality", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime"):
        setattr(step, keyword, "")
    identifier.ScheduledProcedureStepSequence = [step]
    ae = AE(ae_title="BACKUPTEST")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="BROKER")
    assert assoc.is_established
    answers = []
    try:
        for status, found in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
            assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
            if found is not None and status.Status != 0x0000:
                sps = found.ScheduledProcedureStepSequence[0]
                answers.append((str(found.PatientName), found.PatientID, found.AccessionNumber, found.StudyInstanceUID,
                                sps.ScheduledProcedureStepID, sps.Modality, sps.ScheduledProcedureStepStartDate))
    finally:
        assoc.release()
    return sorted(answers)


def counts(engine: Engine) -> tuple[int, int, int]:
    with engine.connect() as db:
        return tuple(int(db.execute(select(func.count()).select_from(table_of(model))).scalar_one())  # type: ignore[return-value]
                     for model in (Order, RequestedProcedure, ScheduledStep))


@pytest.fixture
def restored_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the same backend to restore into."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'restored' / 'broker.db'}"
    else:
        yield from _postgres_database()


def test_backup_while_writing_then_restore_serves_the_same_worklist(engine: Engine, database_url: str,
                                                                    restored_url: str, mappings: MappingSet,
                                                                    tmp_path: Path) -> None:
    place(Intake(engine, mappings), *[HL7Order(f"BK{n}", "CTBACK", start=FUTURE, name=f"BACKUP^PAT{n}")
                                      for n in range(6)])
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        intake = Intake(engine, mappings)
        while not stop.is_set():
            place(intake, HL7Order(f"WR{len(written)}", "MRWRITE", modality="MR", start=FUTURE))
            written.append(1)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(written) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        target = tmp_path / ("backup.db" if database_url.startswith("sqlite") else "backup.dump")
        backed_up = run_cli("db", "backup", str(target), env=env_for(database_url))
        during = len(written)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert backed_up.returncode == 0, backed_up.stderr
    assert backed_up.stdout.startswith(f"backup written to {target} (")
    assert during > 5, "the writer wrote while the backup ran"

    restored = run_cli("db", "restore", str(target), env=env_for(restored_url))
    assert restored.returncode == 0, restored.stderr
    restored_engine = make_engine(restored_url)
    try:
        orders, procedures, steps = counts(restored_engine)
        # one consistent moment: every order restored whole, none half
        assert orders == procedures == steps
        assert 6 + 5 <= orders <= 6 + len(written)
    finally:
        restored_engine.dispose()

    original = DicomServer(load_settings(dicom_host="127.0.0.1", dicom_port=free_port()), engine)
    original.start()
    try:
        expected = worklist(original.port, "CTBACK")
    finally:
        original.stop()
    assert len(expected) == 6
    dicom_port, http_port = free_port(), free_port()
    env = env_for(restored_url, BROKER_HL7_PORT=str(free_port()), BROKER_DICOM_PORT=str(dicom_port),
                  BROKER_DICOM_HOST="127.0.0.1", BROKER_HTTP_PORT=str(http_port), BROKER_HTTP_HOST="127.0.0.1")
    with broker_run(env, dicom_port, http_port):
        assert worklist(dicom_port, "CTBACK") == expected


def test_backup_errors_are_clear(tmp_path: Path) -> None:
    missing = run_cli("db", "backup", str(tmp_path / "copy.db"), env=env_for(f"sqlite:///{tmp_path / 'none.db'}"))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"broker: no SQLite database at {tmp_path / 'none.db'}"
    no_file = run_cli("db", "restore", str(tmp_path / "absent.dump"), env=env_for(f"sqlite:///{tmp_path / 'x.db'}"))
    assert no_file.returncode == 1
    assert no_file.stderr.strip() == f"broker: no backup file {tmp_path / 'absent.dump'}"
