"""Worklist folder benchmark (issue 23): import of a folder of ``.wl`` files, and the watcher's latency.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/worklist_import.py                          # 100,000 files, 1,000 latencies, SQLite
    .venv/bin/python bench/worklist_import.py --files 20000 --latency-files 200 --backend postgresql

1. *Import*: ``--files`` ``.wl`` files (one step each, the attributes a RIS export writes, 50 AE
   sub-folders as wlmscpfs keeps them) are written into a temporary folder, then loaded by the real
   command ``broker import-worklist DIR`` in a child process, whose progress bar is on the console.
   Measured: items per second (wall time of the command, start-up included), its peak RSS
   (``wait4``'s ``ru_maxrss``), its CPU time per item (``wait4``'s user + system time) and, on
   PostgreSQL, the CPU time per item of the server processes serving the bench's database (their
   ``/proc/<pid>/stat``, polled while the command runs).
2. *Latency*: ``--background-files`` files lie in the folder's ``WLFILES`` sub-folder (the wlmscpfs layout,
   with its ``lockfile``). ``broker run`` (a child process, on the imported database) watches the folder
   with the default settle time; once it answers for the last background file, ``--latency-files`` files
   are each written under a hidden name and renamed into place, one after the other, and a pynetdicom
   modality asks C-FIND for the file's Patient ID on one association until the item is answered. Then DCMTK
   ``wlmscpfs -dfp`` serves the same folder and ``--peer-latency-files`` more renames are timed the same
   way. Measured per server: rename -> first answer containing the item (p50 / p99 / max) and the CPU
   time of its process tree per query sent.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom import Dataset  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import UID, ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.association import Association  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]  # noqa: E402

from bench.hl7_throughput import tree_cpu_seconds  # noqa: E402

BROKER = [sys.executable, "-m", "broker"]
UID_PREFIX = "1.2.826.0.1.3680043.10.543.99."
MODALITIES = ["CT", "MR", "US", "CR", "DX", "MG", "NM", "PT", "XA", "RF"]


def wl_file(n: int) -> bytes:
    """The n-th file: a typical item (about 1 KB) with its own patient, study and step."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = f"A{n:09d}"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.PatientName = f"PATIENT{n}^TEST"
    ds.PatientID = f"P{n:09d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "FM"[n % 2]
    ds.StudyInstanceUID = f"{UID_PREFIX}{n}"
    ds.RequestingPhysician = "CUDDY^LISA"
    ds.RequestedProcedureDescription = "EXAMINATION"
    ds.RequestedProcedureID = f"RP{n:09d}"
    ds.RequestedProcedurePriority = "ROUTINE"
    step = Dataset()
    modality = MODALITIES[n % len(MODALITIES)]
    step.ScheduledStationAETitle = f"{modality}{n % 5:02d}"
    step.ScheduledProcedureStepStartDate = f"202612{1 + n % 28:02d}"
    step.ScheduledProcedureStepStartTime = f"{7 + n % 12:02d}{n % 4 * 15:02d}00"
    step.Modality = modality
    step.ScheduledPerformingPhysicianName = "GREY^MEREDITH"
    step.ScheduledProcedureStepDescription = "EXAMINATION"
    step.ScheduledStationName = f"ROOM{n % 50}"
    step.ScheduledProcedureStepLocation = "RADIOLOGY"
    step.ScheduledProcedureStepID = f"S{n:09d}"
    ds.ScheduledProcedureStepSequence = [step]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.31")
    meta.MediaStorageSOPInstanceUID = UID(f"{UID_PREFIX}9.{n}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_folder(folder: Path, count: int) -> None:
    for n in range(count):
        sub = folder / f"AE{n % 50:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{n:09d}.wl").write_bytes(wl_file(n))


def environment(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_DATABASE_URL=database_url, BROKER_LOG_FORMAT="json", BROKER_LOG_LEVEL="WARNING", **extra)
    return env


def database(backend: str, work: Path, pg_url: str) -> str:
    """A fresh database of ``backend``, migrated."""
    if backend == "sqlite":
        url = f"sqlite:///{work}/broker.db"
    else:
        from sqlalchemy import create_engine, text

        name = f"bench_wl_{os.getpid()}"
        admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as db:
            db.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            db.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = pg_url.rsplit("/", 1)[0] + f"/{name}"
    subprocess.run([*BROKER, "db", "upgrade"], cwd=ROOT, env=environment(url), check=True,
                   stdout=subprocess.DEVNULL)
    return url


@dataclass
class ImportRun:
    """One ``broker import-worklist``: wall time, peak RSS, CPU seconds of the command and of the
    database server's processes for it (0 on SQLite)."""

    files: int
    seconds: float
    rss_kb: int
    broker_cpu: float
    database_cpu: float

    def line(self, backend: str) -> str:
        per_item = 1e6 / self.files
        return (f"import ({backend}): {self.files} files in {self.seconds:.1f} s = {self.files / self.seconds:.0f} "
                f"items/s, peak RSS {self.rss_kb / 1024:.0f} MB, CPU per item: broker {self.broker_cpu * per_item:.0f} "
                f"us, PostgreSQL {self.database_cpu * per_item:.0f} us")


def backend_cpu(database_name: str) -> dict[int, float]:
    """CPU seconds (user + system) so far of each PostgreSQL server process serving ``database_name``
    (its process title names the database)."""
    found: dict[int, float] = {}
    if not database_name:
        return found
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            title = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not title.startswith("postgres:") or f" {database_name} " not in title:
                continue
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


NO_PARSING_PROCESS = [sys.executable, "-c", "import sys; import broker.worklist_files.folders as f; "
                      "f.PARSING_PROCESS_MINIMUM = 1 << 60; from broker.cli import main; "
                      "raise SystemExit(main(sys.argv[1:]))"]


def bench_import(url: str, folder: Path, *, parsing_process: bool = True) -> ImportRun:
    """``broker import-worklist`` on the folder, with the CPU time of the command and of the database
    server's processes for it (polled every 0.2 s: a backend's last value before it exits is kept)."""
    count = sum(1 for _ in folder.rglob("*.wl"))
    database_name = url.rsplit("/", 1)[1] if url.startswith("postgresql") else ""
    server: dict[int, float] = {}
    started = time.perf_counter()
    command = BROKER if parsing_process else NO_PARSING_PROCESS
    child = subprocess.Popen([*command, "import-worklist", str(folder)], cwd=ROOT, env=environment(url))
    while True:
        server.update(backend_cpu(database_name))
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"import-worklist failed ({child.returncode})")
    return ImportRun(count, seconds, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, sum(server.values()))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit("broker run did not start")


PEER_AE = "WLFILES"  # the latency folder's sub-folder: the called AE title wlmscpfs serves from it
WLMSCPFS = shutil.which("wlmscpfs") or "wlmscpfs"


@dataclass
class Latencies:
    """Rename -> C-FIND answer for one server, and the CPU its process tree spent meanwhile."""

    server: str
    seconds: list[float]
    queries: int
    cpu: float | None

    def line(self) -> str:
        ms = [value * 1000 for value in self.seconds]
        cpu = f", CPU {self.cpu / self.queries * 1000:.1f} ms per query" if self.cpu is not None else ""
        return (f"{self.server} (rename -> C-FIND, {len(ms)} files): p50 {percentile(ms, 50):.1f} ms, "
                f"p99 {percentile(ms, 99):.1f} ms, max {max(ms):.1f} ms, mean {statistics.mean(ms):.1f} ms, "
                f"{self.queries} queries{cpu}")


def write_background(folder: Path, numbers: range) -> None:
    """The files already in the served folder, with the ``lockfile`` wlmscpfs wants beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lockfile").touch()
    for n in numbers:
        (folder / f"{n}.wl").write_bytes(wl_file(n))


def _patient_query(n: int) -> Dataset:
    identifier = Dataset()
    identifier.PatientID = f"P{n:09d}"
    step = Dataset()
    step.ScheduledProcedureStepID = ""
    identifier.ScheduledProcedureStepSequence = [step]
    return identifier


def _answered_at(assoc: Association, n: int) -> float | None:
    """``perf_counter`` when a C-FIND for file ``n``'s Patient ID first returned the item, ``None`` when it
    did not. Reads every response, the final one included: a new C-FIND sent while the last one's responses
    are still coming is a protocol error for wlmscpfs."""
    answered = None
    final = None
    for status, _ in assoc.send_c_find(_patient_query(n), ModalityWorklistInformationFind):
        final = status
        if answered is None and "Status" in status and status.Status in (0xFF00, 0xFF01):
            answered = time.perf_counter()
    if final is None or "Status" not in final:
        raise SystemExit(f"C-FIND for file {n}: no final status (association aborted)")
    return answered


def time_renames(port: int, called_ae: str, folder: Path, numbers: range, *, ready: int | None = None,
                 ) -> tuple[list[float], int]:
    """Rename -> the first C-FIND response holding the item, in seconds, per file; and the queries sent.

    ``ready``: a file number already in the folder, asked for first until answered (the server has read
    the folder), before the clock starts.
    """
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established
    latencies, queries = [], 0
    try:
        if ready is not None:
            deadline = time.monotonic() + 600
            while _answered_at(assoc, ready) is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{called_ae} did not answer file {ready} within 600 s")
                time.sleep(0.5)
        for n in numbers:
            temporary, final = folder / f".{n}.wl.tmp", folder / f"{n}.wl"
            temporary.write_bytes(wl_file(n))
            os.replace(temporary, final)
            renamed = time.perf_counter()
            while True:
                queries += 1
                answered = _answered_at(assoc, n)
                if answered is not None:
                    latencies.append(answered - renamed)
                    break
                if time.perf_counter() - renamed > 30:
                    raise SystemExit(f"file {n} not answered within 30 s")
    finally:
        assoc.release()
    return latencies, queries


def bench_latency(url: str, root: Path, numbers: range, ready: int | None) -> Latencies:
    """``broker run`` watching ``root`` (files renamed into its ``PEER_AE`` sub-folder)."""
    dicom_port, http_port = free_port(), free_port()
    env = environment(url, BROKER_WORKLIST_FOLDERS=str(root), BROKER_DICOM_PORT=str(dicom_port),
                      BROKER_HTTP_PORT=str(http_port), BROKER_HL7_PORT=str(free_port()))
    broker = subprocess.Popen([*BROKER, "run"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(http_port)
        time.sleep(1.0)  # the watcher takes the lease and makes its first scan
        if ready is not None:
            time_renames(dicom_port, "BROKER", root / PEER_AE, range(0), ready=ready)
        before = tree_cpu_seconds(broker.pid)
        latencies, queries = time_renames(dicom_port, "BROKER", root / PEER_AE, numbers)
        after = tree_cpu_seconds(broker.pid)
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
    cpu = after - before if before is not None and after is not None else None
    return Latencies("broker", latencies, queries, cpu)


def bench_latency_wlmscpfs(root: Path, numbers: range, ready: int | None) -> Latencies:
    """DCMTK ``wlmscpfs`` serving ``root`` (it reads the folder's files at each query)."""
    port = free_port()
    server = subprocess.Popen([WLMSCPFS, "-csk", "-dfp", str(root), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        if ready is not None:
            time_renames(port, PEER_AE, root / PEER_AE, range(0), ready=ready)
        before = tree_cpu_seconds(server.pid)
        latencies, queries = time_renames(port, PEER_AE, root / PEER_AE, numbers)
        after = tree_cpu_seconds(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    cpu = after - before if before is not None and after is not None else None
    return Latencies("wlmscpfs", latencies, queries, cpu)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--latency-files", type=int, default=1_000)
    parser.add_argument("--background-files", type=int, default=10_000,
                        help="files already in the folder the latency runs rename into")
    parser.add_argument("--peer-latency-files", type=int, default=100,
                        help="renames timed against DCMTK wlmscpfs serving the same folder (0 = none)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--compare-parsing-process", action="store_true",
                        help="import the folder twice into two fresh databases: parsed in the importing "
                             "process, then with the parsing process (A/B on the same files)")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-wl-"))
    try:
        url = database(args.backend, work, args.pg_url)
        if args.files:
            started = time.perf_counter()
            write_folder(work / "export", args.files)
            print(f"wrote {args.files} .wl files in {time.perf_counter() - started:.1f} s", flush=True)
            if args.compare_parsing_process:
                alone = bench_import(url, work / "export", parsing_process=False)
                print("without parsing process:", alone.line(args.backend), flush=True)
                url = database(args.backend, work / "second", args.pg_url)
                print("with parsing process:   ", end=" ", flush=True)
            print(bench_import(url, work / "export").line(args.backend), flush=True)
        if args.latency_files or args.peer_latency_files:
            root = work / "watched"
            first = args.files + 1
            background = range(first, first + args.background_files)
            write_background(root / PEER_AE, background)
            ready = background[-1] if args.background_files else None
            numbers = range(background.stop, background.stop + args.latency_files)
            if args.latency_files:
                print(bench_latency(url, root, numbers, ready).line(), flush=True)
            if args.peer_latency_files:
                peer_numbers = range(numbers.stop, numbers.stop + args.peer_latency_files)
                print(bench_latency_wlmscpfs(root, peer_numbers, ready).line(), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
