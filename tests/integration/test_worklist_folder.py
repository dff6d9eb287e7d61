"""A watched worklist folder as an interface engine feeds it (issue 23, section 1): files renamed into
place or written in place, rewritten, deleted, unreadable; a restart; two nodes; a modality querying
while a file is written; ``broker import-worklist`` and ``broker run`` as an operator uses them.

Each test runs on SQLite and PostgreSQL; the watcher is the real one (watchdog's inotify events and
the periodic scan), the worklist is asked over the network by pynetdicom as a modality would.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from sqlalchemy import Engine, func, select
from worklist_file_support import Item, wl_bytes, write_wl

from broker.config import load_settings
from broker.dicom.server import DicomServer
from broker.reports import procedure_report
from broker.store import migrate
from broker.store.session import make_engine
from broker.store.tables import AuditRecord, InboundMessage, ScheduledStep, StepTransition, WorklistFile, table_of
from broker.worklist_files.importer import import_folder
from broker.worklist_files.intake import FileIntake
from broker.worklist_files.watcher import FolderWatcher
from tests.dicom_support import wait_until
from tests.integration.test_cli import broker_run, env_for, run_cli
from tests.integration.test_web_api import AS_READER, AS_WRITER, make_client
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Invalid value for VR"),
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]

STEPS = table_of(ScheduledStep)
MESSAGES = table_of(InboundMessage)
FILES = table_of(WorklistFile)
TRANSITIONS = table_of(StepTransition)
AUDIT = table_of(AuditRecord)
SETTLE = 0.3


@pytest.fixture
def migrated(engine: Engine) -> Engine:
    migrate.upgrade(engine)
    return engine


def watch(engine: Engine, folder: Path, *, holder: str = "node-a", on_delete: str = "cancel",
          scan_interval: float = 0.5) -> FolderWatcher:
    folder.mkdir(parents=True, exist_ok=True)  # the watcher never makes its folder (a share not mounted)
    watcher = FolderWatcher(engine, [folder], FileIntake(engine, on_delete=on_delete), holder=holder,
                            settle_seconds=SETTLE, scan_interval=scan_interval, lease_seconds=3)
    watcher.start()
    return watcher


@pytest.fixture
def watched(migrated: Engine, tmp_path: Path) -> Iterator[tuple[Engine, Path, FolderWatcher]]:
    folder = tmp_path / "worklists"
    watcher = watch(migrated, folder)
    wait_until(lambda: watcher.active and watcher.scans > 0, what="the watcher holds the lease")
    try:
        yield migrated, folder, watcher
    finally:
        watcher.stop()


def steps(engine: Engine) -> dict[str, Any]:
    with engine.connect() as db:
        return {row.sps_id: row for row in db.execute(select(STEPS))}


def status_of(engine: Engine, sps_id: str) -> str | None:
    row = steps(engine).get(sps_id)
    return row.sps_status if row is not None else None


def count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def test_a_new_file_becomes_a_scheduled_step_with_archive_timeline_and_audit(
        watched: tuple[Engine, Path, FolderWatcher]) -> None:
    engine, folder, _ = watched
    write_wl(folder / "CT01" / "one.wl", Item("F1", accession="ACC-F1").dataset())
    wait_until(lambda: status_of(engine, "F1") == "SCHEDULED", what="the step")
    step = steps(engine)["F1"]
    assert step.scheduled_station_ae_title == "CT01" and step.patient_name == "DOE^JANE"
    with engine.connect() as db:
        archived = db.execute(select(MESSAGES)).one()
        [transition] = db.execute(select(TRANSITIONS).where(TRANSITIONS.c.step_fk == step.id)).all()
        state = db.execute(select(FILES)).one()
    assert (archived.message_type, archived.status, archived.peer) == ("DICOM^WL", "accepted", "file CT01/one.wl")
    assert bytes(archived.raw) == (folder / "CT01" / "one.wl").read_bytes()  # the bytes as read
    assert transition.inbound_message_fk == archived.id and transition.cause == "worklist file CT01/one.wl"
    assert (state.outcome, state.message_id, state.present) == ("created", archived.id, True)
    report = procedure_report(engine, "ACC-F1")  # the procedure the board and REST API show
    assert report is not None and "state SCHEDULED" in report and "order WL" in report
    with engine.connect() as db:
        [order_record] = db.execute(select(AUDIT).where(AUDIT.c.event_id == "110109")).all()
    assert order_record.user_id.startswith("worklist folder ")  # who asked: the folder


def test_rewriting_a_file_updates_its_step_and_deleting_it_cancels_it(
        watched: tuple[Engine, Path, FolderWatcher]) -> None:
    engine, folder, _ = watched
    path = folder / "CT01" / "two.wl"
    write_wl(path, Item("F2", time="090000").dataset())
    wait_until(lambda: status_of(engine, "F2") == "SCHEDULED", what="the step")
    write_wl(path, Item("F2", time="113000", name="DOE^JANET").dataset())  # same Study UID + SPS ID
    wait_until(lambda: steps(engine)["F2"].sps_start_time == "113000", what="the update")
    assert steps(engine)["F2"].patient_name == "DOE^JANET" and len(steps(engine)) == 1
    path.unlink()
    wait_until(lambda: status_of(engine, "F2") == "CANCELED", what="the cancel")
    with engine.connect() as db:
        kinds = [r.message_type for r in db.execute(select(MESSAGES).order_by(MESSAGES.c.id))]
        causes = [r.cause for r in db.execute(select(TRANSITIONS).order_by(TRANSITIONS.c.id))]
    assert kinds == ["DICOM^WL", "DICOM^WL", "DICOM^WL-DEL"]
    assert causes == ["worklist file CT01/two.wl", "worklist file CT01/two.wl deleted"]


def test_a_file_without_study_uid_and_sps_id_is_known_by_its_name(
        watched: tuple[Engine, Path, FolderWatcher]) -> None:
    engine, folder, _ = watched
    ds = Item("", name="NOUID^NORA").dataset()
    del ds.StudyInstanceUID
    write_wl(folder / "nouid.wl", ds)
    wait_until(lambda: "" in steps(engine), what="the step")
    study_uid = steps(engine)[""].study_instance_uid
    assert study_uid.startswith("2.25.")  # derived for the broker's key, stable for the file
    ds.PatientName = "NOUID^NORAH"
    write_wl(folder / "nouid.wl", ds)
    wait_until(lambda: steps(engine)[""].patient_name == "NOUID^NORAH", what="the update")
    assert len(steps(engine)) == 1 and steps(engine)[""].study_instance_uid == study_uid


def test_an_unreadable_file_is_moved_aside_listed_and_not_retried(
        watched: tuple[Engine, Path, FolderWatcher]) -> None:
    engine, folder, watcher = watched
    write_wl(folder / "CT01" / "broken.wl", b"MSH|^~\\&|not a dicom file")
    no_patient = Item("F3").dataset()
    no_patient.PatientID = ""
    write_wl(folder / "CT01" / "nopatient.wl", no_patient)
    wait_until(lambda: (folder / ".failed" / "CT01" / "broken.wl").exists(), what="the file moved aside")
    wait_until(lambda: count(engine, MESSAGES, MESSAGES.c.status == "error") == 2, what="both listed")
    with engine.connect() as db:
        errors = {r.peer: r.error for r in db.execute(select(MESSAGES).where(MESSAGES.c.status == "error"))}
    assert errors == {"file CT01/broken.wl": "not a readable DICOM file (no data elements)",
                      "file CT01/nopatient.wl": "no Patient ID"}
    scans = watcher.scans
    wait_until(lambda: watcher.scans >= scans + 2, what="two more scans")
    assert count(engine, MESSAGES) == 2 and not steps(engine)  # read once each, never again
    assert (folder / "CT01" / "nopatient.wl").exists()  # readable, refused: stays until it is fixed
    write_wl(folder / "CT01" / "nopatient.wl", Item("F3").dataset())
    wait_until(lambda: status_of(engine, "F3") == "SCHEDULED", what="the fixed file")


def test_keep_on_delete_leaves_the_step(migrated: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "worklists"
    watcher = watch(migrated, folder, on_delete="keep")
    try:
        write_wl(folder / "keep.wl", Item("F4").dataset())
        wait_until(lambda: status_of(migrated, "F4") == "SCHEDULED", what="the step")
        (folder / "keep.wl").unlink()
        wait_until(lambda: count(migrated, FILES, FILES.c.present.is_(False)) == 1, what="the deletion seen")
        assert status_of(migrated, "F4") == "SCHEDULED"
    finally:
        watcher.stop()


def test_a_restart_does_not_read_unchanged_files_again(migrated: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "worklists"
    for n in range(20):
        write_wl(folder / "CR" / f"{n}.wl", Item(f"R{n}").dataset())
    time.sleep(SETTLE)
    first = watch(migrated, folder)
    wait_until(lambda: len(steps(migrated)) == 20, what="every file read")
    first.stop()
    write_wl(folder / "CR" / "new.wl", Item("R20").dataset())  # written while the broker is down
    (folder / "CR" / "0.wl").unlink()
    time.sleep(SETTLE)
    second = watch(migrated, folder, holder="node-a-restarted")
    try:
        wait_until(lambda: second.scans >= 1 and status_of(migrated, "R0") == "CANCELED", what="the first scan")
        assert status_of(migrated, "R20") == "SCHEDULED"
        assert count(migrated, MESSAGES) == 22  # 20 files, the new one, the deletion: nothing read twice
    finally:
        second.stop()


def test_one_node_reads_and_the_other_takes_over_when_it_stops(migrated: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "worklists"
    a = watch(migrated, folder, holder="node-a")
    wait_until(lambda: a.active, what="node a holds the lease")
    b = watch(migrated, folder, holder="node-b")
    try:
        for n in range(10):
            write_wl(folder / f"{n}.wl", Item(f"N{n}").dataset())
        wait_until(lambda: len(steps(migrated)) == 10, what="every file read")
        assert not b.active and count(migrated, MESSAGES) == 10  # read once, by node a
        a.stop()
        wait_until(lambda: b.active, seconds=10, what="node b takes over")
        write_wl(folder / "late.wl", Item("N10").dataset())
        wait_until(lambda: status_of(migrated, "N10") == "SCHEDULED", what="node b reads")
        assert count(migrated, MESSAGES) == 11
    finally:
        a.stop()
        b.stop()


def _query(port: int, stop: threading.Event, seen: list[Dataset]) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    identifier = Dataset()
    identifier.PatientName = ""
    identifier.PatientID = "P-HALF"
    identifier.AccessionNumber = ""
    step = Dataset()
    step.ScheduledProcedureStepID = ""
    step.ScheduledProcedureStepDescription = ""
    identifier.ScheduledProcedureStepSequence = [step]
    assoc = ae.associate("127.0.0.1", port, ae_title="BROKER")
    try:
        while not stop.is_set():
            for status, dataset in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
                if status is not None and status.Status in (0xFF00, 0xFF01):
                    seen.append(dataset)
    finally:
        assoc.release()


def test_a_file_written_while_a_modality_queries_is_never_returned_half_read(
        watched: tuple[Engine, Path, FolderWatcher]) -> None:
    engine, folder, _ = watched
    server = DicomServer(load_settings(dicom_host="127.0.0.1", dicom_port=free_port()), engine)
    server.start()
    seen: list[Dataset] = []
    stop = threading.Event()
    querying = threading.Thread(target=_query, args=(server.port, stop, seen))
    querying.start()
    try:
        item = Item("HALF", patient_id="P-HALF", name="LONG^" + "X" * 50, description="D" * 60)
        data = wl_bytes(item.dataset())
        path = folder / "CT01" / "half.wl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:  # written in place, in pieces, each pause shorter than the settle time
            for start in range(0, len(data), 64):
                out.write(data[start:start + 64])
                out.flush()
                time.sleep(SETTLE / 10)
        wait_until(lambda: any(s.get("AccessionNumber") for s in seen), what="the item in the answers")
        path.write_bytes(data[: len(data) // 2])  # rewritten with half its bytes, then completed at once
        path.write_bytes(data.replace(b"A-HALF", b"B-HALF"))
        wait_until(lambda: any(s.AccessionNumber == "B-HALF" for s in seen), what="the rewrite")
    finally:
        stop.set()
        querying.join(30)
        server.stop()
    assert seen
    for answer in seen:  # every answer is the whole item, before or after the rewrite
        assert str(answer.PatientName) == "LONG^" + "X" * 50
        assert answer.AccessionNumber in ("A-HALF", "B-HALF")
        assert answer.ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription == "D" * 60
    assert count(engine, MESSAGES, MESSAGES.c.status == "error") == 0


def test_import_worklist_command(database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    for n in range(30):
        write_wl(folder / "MR1" / f"{n}.wl", Item(f"I{n}", station="MR1", modality="MR").dataset())
    write_wl(folder / "MR1" / "junk.wl", b"\x00" * 10)
    env = env_for(database_url)
    assert run_cli("db", "upgrade", env=env).returncode == 0
    dry = run_cli("import-worklist", str(folder), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing was changed" in dry.stdout and "would be created: 30" in dry.stdout
    assert "would be refused: 1" in dry.stdout and "MR1/junk.wl: not a readable DICOM file" in dry.stdout
    assert (folder / "MR1" / "junk.wl").exists()
    engine = make_engine(database_url)
    try:
        assert count(engine, MESSAGES) == 0 and not steps(engine)
        done = run_cli("import-worklist", str(folder), env=env)
        assert done.returncode == 0, done.stderr
        assert "items read: 31" in done.stdout and "created: 30" in done.stdout and "refused: 1" in done.stdout
        assert "unreadable files moved to .failed/: 1" in done.stdout
        assert len(steps(engine)) == 30 and (folder / ".failed" / "MR1" / "junk.wl").exists()
        write_wl(folder / "MR1" / "3.wl", Item("I3", station="MR1", modality="MR", time="160000").dataset())
        again = run_cli("import-worklist", str(folder), env=env)
        assert "updated: 1" in again.stdout and "unchanged: 29" in again.stdout and "created: 0" in again.stdout
        assert len(steps(engine)) == 30
    finally:
        engine.dispose()


def test_broker_run_watches_the_folders_of_its_settings(database_url: str, tmp_path: Path) -> None:
    folders = [tmp_path / "wlmscpfs", tmp_path / "orthanc"]
    write_wl(folders[0] / "CT01" / "a.wl", Item("W1").dataset())
    write_wl(folders[1] / "b.wl", Item("W2", station="US2", modality="US").dataset())
    time.sleep(SETTLE)
    http_port = free_port()
    env = env_for(database_url, BROKER_HL7_PORT=str(free_port()), BROKER_DICOM_PORT=str(free_port()),
                  BROKER_HTTP_PORT=str(http_port), BROKER_WORKLIST_FOLDERS=":".join(map(str, folders)),
                  BROKER_WORKLIST_SETTLE_SECONDS="0.3")
    engine = make_engine(database_url)
    try:
        with broker_run(env, http_port, stderr=subprocess.DEVNULL):
            wait_until(lambda: {"W1", "W2"} <= set(steps(engine)), what="both folders read")
            write_wl(folders[1] / "c.wl", Item("W3").dataset())
            wait_until(lambda: status_of(engine, "W3") == "SCHEDULED", what="a new file read")
    finally:
        engine.dispose()



def test_failed_files_are_listed_and_shown_with_the_failed_intakes(migrated: Engine, tmp_path: Path) -> None:
    """GET /api/messages?status=error lists a refused file beside the refused HL7 messages; its view shows
    the file as a DICOM dump; it is replayed by writing it into its folder again, not over HTTP (409)."""
    folder = tmp_path / "worklists"
    no_patient = Item("F9").dataset()
    no_patient.PatientID = ""
    write_wl(folder / "CT01" / "nopatient.wl", no_patient)
    write_wl(folder / "CT01" / "good.wl", Item("F8").dataset())
    summary = import_folder(FileIntake(migrated), folder)
    assert summary.refused == [("CT01/nopatient.wl", "no Patient ID")]
    with make_client(migrated) as client:
        [failed] = client.get("/api/messages", params={"status": "error"}, headers=AS_READER).json()["items"]
        assert (failed["message_type"], failed["peer"], failed["error"], failed["ack_code"]) == (
            "DICOM^WL", "file CT01/nopatient.wl", "no Patient ID", "AE")
        detail = client.get(f"/api/messages/{failed['id']}", headers=AS_READER).json()
        assert "(0010,0020) Patient ID" in detail["text"] and "F9" in detail["text"]
        replay = client.post(f"/api/messages/{failed['id']}/replay", headers=AS_WRITER)
        assert replay.status_code == 409 and "folder" in replay.json()["detail"]
