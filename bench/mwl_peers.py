"""The servers of the MWL C-FIND benchmark: ``broker run`` and its two peers, DCMTK ``wlmscpfs`` and Orthanc.

Each starts as a subprocess in its own session (process group) on free ports of 127.0.0.1, with its output
in a log file, and counts as ready once a C-ECHO succeeds. :func:`stop_server` sends SIGTERM and, 10 s later,
SIGKILL to the whole group. The servers run as shipped: the only settings given are the ones a site must
give (ports, AE title, where the worklist is) and those needed to accept queries from unknown callers.
``TCP_NODELAY`` is removed from their environment (DCMTK reads it; the peers are measured with DCMTK's
default, Nagle's algorithm on).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hl7_throughput import _kill_group, broker_command, free_port  # noqa: E402

WLMSCPFS = "wlmscpfs"
ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")
PEER_AE = "MWL"  # called AE title of the peers; wlmscpfs serves the directory of that name
BROKER_AE = "BROKER"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PEERS = ("wlmscpfs", "orthanc")
BROKER_TARGETS = {"broker-sqlite": "sqlite", "broker-postgresql": "postgresql"}


class NotServing(RuntimeError):
    """The server started (or not) but never answered a C-ECHO."""


@dataclasses.dataclass
class Server:
    target: str
    process: subprocess.Popen[bytes]
    port: int
    called_ae: str
    log_path: Path
    command: list[str]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    env.update(extra or {})
    return env


def _spawn(target: str, command: list[str], port: int, called_ae: str, workdir: Path, env: dict[str, str],
           cwd: Path, settings: dict[str, Any]) -> Server:
    log_path = workdir / f"{target}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Server(target, process, port, called_ae, log_path, command, settings)


def echo(port: int, called_ae: str, timeout: float = 5.0) -> str:
    """One C-ECHO; '' when it succeeded, else what went wrong."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "no association"
    try:
        status = assoc.send_c_echo()
        return "" if status and status.Status == 0 else f"C-ECHO status {status.get('Status') if status else None}"
    finally:
        assoc.release()


def wait_ready(server: Server, timeout: float = START_TIMEOUT) -> float:
    """Waits until a C-ECHO succeeds; returns the seconds it took. Raises :class:`NotServing`."""
    started = time.monotonic()
    last = ""
    while True:
        if not server.alive():
            raise NotServing(f"{server.target} exited with status {server.process.returncode} before it answered "
                             f"a C-ECHO on port {server.port}:\n{server.log_tail()}")
        last = echo(server.port, server.called_ae, timeout=2.0)
        if not last:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise NotServing(f"{server.target} is running but did not answer a C-ECHO on port {server.port} within "
                             f"{timeout:.0f} s (last: {last}):\n{server.log_tail()}")
        time.sleep(0.2)


def stop_server(server: Server) -> dict[str, Any]:
    """SIGTERM, then SIGKILL of its process group after STOP_TIMEOUT; returns how it ended."""
    started = time.monotonic()
    if not server.alive():
        how = "exited by itself"
    else:
        server.process.terminate()
        try:
            server.process.wait(timeout=STOP_TIMEOUT)
            how = "SIGTERM"
        except subprocess.TimeoutExpired:
            _kill_group(server.pid)
            server.process.wait(timeout=STOP_TIMEOUT)
            how = f"SIGKILL (still running {STOP_TIMEOUT:.0f} s after SIGTERM)"
    leftovers = _kill_group(server.pid)  # wlmscpfs children of associations still open, broker workers
    return {"exit_status": server.process.returncode, "stopped_by": how,
            "stop_seconds": round(time.monotonic() - started, 3), "killed_leftover_processes": leftovers}


# --------------------------------------------------------------------------------------------------
# the three kinds of server


def start_wlmscpfs(worklist_root: Path, workdir: Path) -> Server:
    """``wlmscpfs`` with its defaults (a forked child per association, at most 50) serving
    ``worklist_root/MWL/*.wl``; ``--keep-char-set`` returns the files' Specific Character Set (ISO_IR 100).

    ``--log-level error``: at its default level it logs two warnings per file and query ("Added missing type 2
    sequence attribute (0008,1110)/(0008,1120)": the broker's items have no Referenced Study/Patient
    Sequence), 20,000 lines per query at 10k items -- 170 MB of log in a two-minute run."""
    port = free_port()
    command = [WLMSCPFS, "--data-files-path", str(worklist_root), "--keep-char-set", "--log-level", "error",
               str(port)]
    return _spawn("wlmscpfs", command, port, PEER_AE, workdir, server_env(), workdir,
                  {"data_files_path": str(worklist_root / PEER_AE), "options": command[1:-1]})


def start_orthanc(worklist_dir: Path, workdir: Path) -> Server:
    """Orthanc with only the ModalityWorklists plugin, reading ``worklist_dir/*.wl``; every other setting is
    Orthanc's default except what a site must set (ports, AE title, storage folder) and
    ``DicomAlwaysAllowFindWorklist`` (worklist queries from callers not listed in DicomModalities)."""
    port, http_port = free_port(), free_port()
    storage = workdir / "orthanc-storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "mwl-bench",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [str(ORTHANC_PLUGIN)],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "DicomAet": PEER_AE,
        "DicomPort": port,
        "DicomAlwaysAllowFindWorklist": True,
        "Worklists": {"Enable": True, "Database": str(worklist_dir)},
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return _spawn("orthanc", [ORTHANC, str(config_path)], port, PEER_AE, workdir, server_env(), workdir, config)


def start_broker(target: str, database_url: str, workdir: Path) -> Server:
    """``broker run`` (cwd = repository root, so ``config/broker.yaml`` and ``mappings/`` apply) on free
    DICOM, HL7 and HTTP ports, ``BROKER_LOG_LEVEL=WARNING``; other ``BROKER_*`` variables pass through."""
    port = free_port()
    env = server_env({
        "BROKER_DATABASE_URL": database_url,
        "BROKER_LOG_LEVEL": "WARNING",
        "BROKER_AE_TITLE": BROKER_AE,
        "BROKER_DICOM_HOST": "127.0.0.1",
        "BROKER_DICOM_PORT": str(port),
        "BROKER_HL7_HOST": "127.0.0.1",
        "BROKER_HL7_PORT": str(free_port()),
        "BROKER_HTTP_PORT": str(free_port()),
    })
    return _spawn(target, [*broker_command(), "run"], port, BROKER_AE, workdir, env, ROOT, {})


def migrate(database_url: str) -> str:
    """``broker db upgrade``; if the command itself cannot start (an import error in the broker being
    worked on), the same :func:`broker.store.migrate.upgrade` in a fresh interpreter. Returns a note."""
    env = server_env({"BROKER_DATABASE_URL": database_url, "BROKER_LOG_LEVEL": "WARNING"})
    done = subprocess.run([*broker_command(), "db", "upgrade"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode == 0:
        return "broker db upgrade"
    output = (done.stdout + done.stderr).strip()
    if "ImportError" not in output and "ModuleNotFoundError" not in output:
        raise RuntimeError(f"'broker db upgrade' failed (exit {done.returncode}):\n{output}")
    code = ("import sys; from broker.store import migrate; from broker.store.session import make_engine; "
            "engine = make_engine(sys.argv[1]); migrate.upgrade(engine); engine.dispose()")
    fallback = subprocess.run([sys.executable, "-c", code, database_url], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600, check=False)
    if fallback.returncode != 0:
        raise RuntimeError(f"migration failed:\n{fallback.stdout}{fallback.stderr}")
    return f"broker.store.migrate.upgrade ('broker db upgrade' did not start: {output.splitlines()[-1]})"


def broker_settings(database_url: str) -> dict[str, Any]:
    """``broker config show`` (the database URL without password), or why it is not available."""
    from sqlalchemy.engine import make_url

    env = server_env({"BROKER_DATABASE_URL": database_url})
    done = subprocess.run([*broker_command(), "config", "show"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    try:
        settings: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]}
    for key in ("dicom_port", "hl7_port", "http_port"):
        settings.pop(key, None)  # free ports are chosen per run
    settings["database_url"] = make_url(database_url).render_as_string(hide_password=True)
    return settings


def tool_versions() -> dict[str, str]:
    """First line of ``wlmscpfs --version``, ``Orthanc --version`` and ``findscu --version``."""
    versions = {}
    for name, command in (("wlmscpfs", [WLMSCPFS, "--version"]), ("orthanc", [ORTHANC, "--version"]),
                          ("findscu", ["findscu", "--version"])):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
            lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            versions[name] = lines[0].strip() if lines else ""
        except OSError as exc:
            versions[name] = f"not available: {exc}"
    return versions
