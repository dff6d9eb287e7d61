"""The broker watching a folder of ``.wl`` files answers modality queries as DCMTK ``wlmscpfs`` serving
the same folder does: the same items, the same attribute values (issue 23, section 2).

The folder is the wlmscpfs layout (one sub-folder per called AE title, with its ``lockfile``); the
broker watches the folder's root and answers under its own AE title. Both are asked by DCMTK
``findscu -W`` with the return keys a modality typically sends. What the broker adds beyond the file
is asserted apart: SPS Status (its own status handling, SCHEDULED for a file that has none).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import module_database
from pydicom import Dataset, dcmread
from worklist_file_support import Item, write_wl

from broker.config import load_settings
from broker.dicom.server import DicomServer
from broker.store import migrate
from broker.store.session import make_engine
from broker.worklist_files.intake import FileIntake
from broker.worklist_files.watcher import FolderWatcher
from tests.dicom_support import wait_until
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Invalid value for VR")]

FINDSCU = shutil.which("findscu") or "findscu"
WLMSCPFS = shutil.which("wlmscpfs") or "wlmscpfs"
AE_FOLDER = "WLFILES"  # the called AE title wlmscpfs serves from the sub-folder of that name
DAY = "20261123"

ITEMS = [
    Item("S1", "CT01", "CT", DAY, "090000", "DOE^JANE", performing="GREY^MEREDITH"),
    Item("S2", "CT01", "CT", DAY, "140000", "ROE^RICHARD", sex="M", performing="SHEPHERD^DEREK"),
    Item("S3", "CT01", "MR", DAY, "100000", "DOE^JOHN", sex="M", performing="GREYSON^DEREK"),
    Item("S4", "CT01", "CT", "20261124", "083000", "SMITH^ANNA"),
    Item("S5", "MR1", "MR", "20261122", "230000", "MÜLLER^ERIKA", charset="ISO_IR 100", description="MR KNIE"),
    Item("S6", "MR1", "MR", "20261125", "120000", "DOE^JANE", patient_id="PID-66"),
    Item("S7", "US2", "US", DAY, "080000", "DOE^JAN", accession="ACC-7", status="SCHEDULED"),
    Item("S8", "US2", "US", DAY, "081500", "BLACK^JACK", birth_date="19551231", sex="M"),
    *(Item(f"B{n:02d}", "CR2", "CR", DAY, f"{8 + n // 4:02d}{n % 4 * 15:02d}00", f"BULK^PATIENT{n}")
      for n in range(12)),
]

# The return keys of a typical modality (PS3.4 K.6 with IHE SWF's required ones), asked empty.
RETURN_TOP = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
              "ReferringPhysicianName", "StudyInstanceUID", "RequestingPhysician", "RequestedProcedureDescription",
              "RequestedProcedureID", "RequestedProcedurePriority"]
RETURN_SPS = ["ScheduledStationAETitle", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
              "Modality", "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
              "ScheduledStationName", "ScheduledProcedureStepLocation", "ScheduledProcedureStepID"]


@dataclass(frozen=True)
class Query:
    top: dict[str, str]
    sps: dict[str, str]
    expected: set[str]


QUERIES: dict[str, Query] = {
    "station-and-today": Query({}, {"ScheduledStationAETitle": "CT01", "ScheduledProcedureStepStartDate": DAY},
                               {"S1", "S2", "S3"}),
    "modality-and-today": Query({}, {"Modality": "US", "ScheduledProcedureStepStartDate": DAY}, {"S7", "S8"}),
    "station-and-modality": Query({}, {"ScheduledStationAETitle": "CT01", "Modality": "MR"}, {"S3"}),
    "patient-id": Query({"PatientID": "PID-66"}, {}, {"S6"}),
    "patient-name-wildcard": Query({"PatientName": "DOE*"}, {}, {"S1", "S3", "S6", "S7"}),
    "patient-name-question-mark": Query({"PatientName": "DOE^JA?"}, {}, {"S7"}),
    "accession-number": Query({"AccessionNumber": "ACC-7"}, {}, {"S7"}),
    "date-range": Query({}, {"ScheduledProcedureStepStartDate": "20261124-20261125"}, {"S4", "S6"}),
    "open-date-range": Query({}, {"ScheduledProcedureStepStartDate": "-20261122"}, {"S5"}),
    "latin-1-station": Query({}, {"ScheduledStationAETitle": "MR1"}, {"S5", "S6"}),
    "performing-physician": Query({}, {"ScheduledPerformingPhysicianName": "GREY*"},
                                  {i.sps_id for i in ITEMS if i.performing.startswith("GREY")}),
    "bulk-station": Query({}, {"ScheduledStationAETitle": "CR2"}, {f"B{n:02d}" for n in range(12)}),
    "everything": Query({}, {}, {i.sps_id for i in ITEMS}),
}


@dataclass
class Servers:
    folder: Path
    wlmscpfs_port: int
    broker_port: int
    watcher: FolderWatcher


def _wait_for_port(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """One folder of .wl files served by wlmscpfs and by the broker watching it, on each database."""
    folder = tmp_path_factory.mktemp("worklists")
    (folder / AE_FOLDER).mkdir()
    (folder / AE_FOLDER / "lockfile").touch()
    for item in ITEMS:
        write_wl(folder / AE_FOLDER / f"{item.sps_id}.wl", item.dataset())
    urls = module_database(request.param, tmp_path_factory, "wlfolder")
    url = next(urls)
    engine = make_engine(url)
    reader = make_engine(url, for_reading=True)
    migrate.upgrade(engine)
    wl_port = free_port()
    wlmscpfs = subprocess.Popen([WLMSCPFS, "-csk", "-dfp", str(folder), str(wl_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watcher = FolderWatcher(engine, [folder], FileIntake(engine), holder="test-node", settle_seconds=0.2,
                            scan_interval=1.0)
    server = DicomServer(load_settings(dicom_host="127.0.0.1", dicom_port=free_port()), reader)
    try:
        _wait_for_port(wl_port)
        watcher.start()
        server.start()
        yield Servers(folder, wl_port, server.port, watcher)
    finally:
        server.stop()
        watcher.stop()
        wlmscpfs.terminate()
        wlmscpfs.wait(10)
        reader.dispose()
        engine.dispose()
        for _ in urls:  # drops the PostgreSQL database
            pass


def findscu(port: int, called: str, query: Query, out: Path, extra_sps: tuple[str, ...] = ()) -> list[Dataset]:
    """DCMTK findscu -W with the query's values and the typical return keys; the extracted responses."""
    out.mkdir(parents=True, exist_ok=True)
    keys = [f"{k}={query.top.get(k, '')}" for k in RETURN_TOP]
    keys += [f"{k}={v}" for k, v in query.top.items() if k not in RETURN_TOP]
    keys += [f"ScheduledProcedureStepSequence[0].{k}={query.sps.get(k, '')}" for k in RETURN_SPS]
    keys += [f"ScheduledProcedureStepSequence[0].{k}" for k in extra_sps]
    args = [FINDSCU, "-W", "-aet", "MODALITY", "-aec", called, "-to", "30", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "LANG": "C"})
    assert result.returncode == 0, result.stderr
    return [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def _values(dataset: Dataset, skip: set[str]) -> dict[str, Any]:
    """Every attribute by keyword, sequences item by item, as text (what a modality would show)."""
    result: dict[str, Any] = {}
    for elem in dataset:
        if elem.keyword in skip:
            continue
        if elem.VR == "SQ":
            result[elem.keyword] = [_values(item, skip) for item in elem.value]
        else:
            result[elem.keyword] = str(elem.value) if elem.value is not None else ""
    return result


def _by_sps(responses: list[Dataset]) -> dict[str, Dataset]:
    return {str(r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID): r for r in responses}


def _all_read(servers: Servers) -> None:
    query = QUERIES["everything"]
    wait_until(lambda: len(findscu(servers.broker_port, "BROKER", query,
                                   servers.folder.parent / f"probe-{time.monotonic_ns()}")) == len(ITEMS),
               what="the broker read every file")


@pytest.mark.parametrize("name", list(QUERIES))
def test_same_items_and_values_as_wlmscpfs(servers: Servers, name: str, tmp_path: Path) -> None:
    _all_read(servers)
    query = QUERIES[name]
    theirs = _by_sps(findscu(servers.wlmscpfs_port, AE_FOLDER, query, tmp_path / "wlmscpfs"))
    ours = _by_sps(findscu(servers.broker_port, "BROKER", query, tmp_path / "broker"))
    assert set(theirs) == query.expected  # the query and the folder are what the test means
    assert set(ours) == set(theirs)
    for sps_id, answer in theirs.items():
        assert _values(ours[sps_id], set()) == _values(answer, set()), sps_id


def test_the_broker_adds_its_status(servers: Servers, tmp_path: Path) -> None:
    """The difference the README lists: SPS Status, SCHEDULED for a file without one (wlmscpfs returns the
    file's, here empty); the character set is the file's on both (wlmscpfs -csk)."""
    _all_read(servers)
    query = Query({}, {"ScheduledStationAETitle": "MR1"}, {"S5", "S6"})
    theirs = _by_sps(findscu(servers.wlmscpfs_port, AE_FOLDER, query, tmp_path / "wlmscpfs",
                             ("ScheduledProcedureStepStatus",)))
    ours = _by_sps(findscu(servers.broker_port, "BROKER", query, tmp_path / "broker",
                           ("ScheduledProcedureStepStatus",)))
    assert theirs["S6"].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == ""
    assert ours["S6"].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "SCHEDULED"
    assert ours["S5"].SpecificCharacterSet == theirs["S5"].SpecificCharacterSet == "ISO_IR 100"
    assert "SpecificCharacterSet" not in ours["S6"] and "SpecificCharacterSet" not in theirs["S6"]
    assert str(ours["S5"].PatientName) == str(theirs["S5"].PatientName) == "MÜLLER^ERIKA"

