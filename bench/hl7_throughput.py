"""HL7 intake benchmark: throughput and ACK latency of ``broker run`` over MLLP, per database backend.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/hl7_throughput.py
    .venv/bin/python bench/hl7_throughput.py --messages 10000 --backends sqlite,postgresql \\
        --connections 1,4 --rate 100 --rate-seconds 30 --json bench/results/hl7.json

For each backend (``sqlite``: a file in a temporary directory; ``postgresql``: a fresh database
``bench_<random>`` created on ``--pg-url`` and dropped at the end) it

1. migrates the fresh database with ``broker db upgrade``;
2. starts ``broker run`` as a subprocess on a free port (cwd = repository root, so it reads
   ``config/broker.yaml`` and ``mappings/``) and samples its resident memory (VmRSS) while it works;
3. throughput runs: for each connection count C, sends ``--messages`` new-order messages (ORM^O01 NW,
   derived from ``samples/hl7/orm_o01_new.hl7`` with unique ids, spread over ~2,000
   patients) split evenly over C persistent MLLP connections, each sending back to back and waiting for
   each ACK. Reports wall time, messages/s and the send -> ACK latency percentiles;
4. a fixed-rate run: one connection offered ``--rate`` messages/s for ``--rate-seconds`` on a fixed
   schedule (message i is due at t0 + i/rate; a late message goes out at once, none is skipped). Latency
   is measured from the scheduled time (includes waiting behind a slow ACK: what a sender with a steady
   feed experiences) and from the actual send time (the broker's own service time).

Every ACK must carry ``MSA|AA``; any other reply, or a connection error, is counted, the first one is
printed, and the run is marked failed (exit status 1). Targets (printed beside the results, they do not
change the exit status): >= 500 messages/s sustained, and p99 ACK < 50 ms at 100 messages/s offered.

The JSON written to ``--json`` (default ``bench/results/hl7-<timestamp>.json``) also holds machine
facts (``nproc``, Python version, CPU model) and a calibration figure -- the best of three timings of a
10-million-iteration pure-Python loop -- so numbers from different machines can be put side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "hl7" / "orm_o01_new.hl7"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")

TARGET_MSGS_PER_S = 500.0
TARGET_P99_MS = 50.0
TARGET_RATE = 100.0
TARGET_TEXT = (f">= {TARGET_MSGS_PER_S:.0f} messages/s sustained",
               f"p99 ACK < {TARGET_P99_MS:.0f} ms at {TARGET_RATE:.0f} messages/s offered")

PATIENTS = 2000
UID_PREFIX = "1.2.826.0.1.3680043.10.543"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLIENT_TIMEOUT = 30.0
MAX_CONSECUTIVE_ERRORS = 5
"""A connection gives up after this many connection errors in a row (the broker is down or hung)."""
RSS_INTERVAL = 0.2
"""Seconds between memory samples (one sample of a 4-process tree costs ~1.5 ms of CPU in this process)."""

# Placeholders in the sample message -> the name of the value that replaces them in each message.
# Each must occur in the sample exactly the given number of times (checked, so a changed sample is noticed).
PLACEHOLDERS: dict[bytes, tuple[str, int]] = {
    b"RIS000101": ("control_id", 1),
    b"PO-77001": ("placer", 2),
    b"FO-77001": ("filler", 2),
    b"ACC77001": ("accession", 1),
    b"RP77001": ("rp_id", 1),
    b"SPS77001": ("sps_id", 1),
    b"1.2.826.0.1.3680043.10.543.77001": ("study_uid", 1),
    b"MRN4711": ("patient_id", 1),
}


# --------------------------------------------------------------------------------------------------
# messages


class MessageFactory:
    """Builds unique new-order messages from the sample; ids carry a per-invocation run tag.

    The sequence number keeps counting across the runs of one invocation, so every message sent to one
    database is a new order (unique MSH-10, placer/filler numbers, accession, RP/SPS ids, study UID),
    while patient ids repeat: ~2,000 patients, so most orders after the first few thousand find their
    patient already stored.
    """

    def __init__(self, template: bytes, seed: int | None = None) -> None:
        for needle, (name, count) in PLACEHOLDERS.items():
            found = template.count(needle)
            if found != count:
                raise SystemExit(f"sample {SAMPLE}: expected {count} x {needle!r} ({name}), found {found}")
        self._parts = self._split(template)
        rng = random.Random(seed)
        self.tag = "".join(rng.choices(string.ascii_uppercase + string.digits, k=5))
        self.uid_run = rng.randint(1, 999_999)  # a UID component: digits, no leading zero
        self._rng = rng
        self._next = 1

    @staticmethod
    def _split(template: bytes) -> list[bytes | str]:
        """The template as literal chunks (bytes) and placeholder names (str), in order."""
        parts: list[bytes | str] = [template]
        for needle, (name, _count) in PLACEHOLDERS.items():
            out: list[bytes | str] = []
            for part in parts:
                if isinstance(part, str):
                    out.append(part)
                    continue
                chunks = part.split(needle)
                for i, chunk in enumerate(chunks):
                    if i:
                        out.append(name)
                    out.append(chunk)
            parts = out
        return parts

    def build(self, count: int) -> list[bytes]:
        """The next ``count`` messages."""
        messages = []
        for _ in range(count):
            n = self._next
            self._next += 1
            values = {
                "control_id": f"BM{self.tag}{n:09d}",  # 16 chars (MSH-10: <= 20)
                "placer": f"PO-{self.tag}{n:08d}",
                "filler": f"FO-{self.tag}{n:08d}",
                "accession": f"A{self.tag}{n:08d}",  # 14 chars (Accession Number SH: <= 16)
                "rp_id": f"RP{self.tag}{n:08d}",  # 15 chars (SH: <= 16)
                "sps_id": f"SP{self.tag}{n:08d}",  # 15 chars (SH: <= 16)
                "study_uid": f"{UID_PREFIX}.{self.uid_run}.{n}",  # <= 44 chars (UI: <= 64)
                "patient_id": f"MRN{self._rng.randrange(1, PATIENTS + 1):05d}",
            }
            messages.append(b"".join(p if isinstance(p, bytes) else values[p].encode("ascii") for p in self._parts))
        return messages


# --------------------------------------------------------------------------------------------------
# statistics


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean in milliseconds."""
    ordered = sorted(seconds)
    ms = 1000.0
    return {
        "p50_ms": percentile(ordered, 50) * ms,
        "p95_ms": percentile(ordered, 95) * ms,
        "p99_ms": percentile(ordered, 99) * ms,
        "max_ms": ordered[-1] * ms if ordered else math.nan,
        "mean_ms": sum(ordered) / len(ordered) * ms if ordered else math.nan,
    }


# --------------------------------------------------------------------------------------------------
# the broker subprocess


def broker_command() -> list[str]:
    """``.venv/bin/broker`` next to this interpreter, else ``python -m broker``."""
    script = Path(sys.executable).with_name("broker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "broker"]


def broker_env(database_url: str, port: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["BROKER_DATABASE_URL"] = database_url
    env["BROKER_LOG_LEVEL"] = "WARNING"
    if port is not None:
        env["BROKER_HL7_PORT"] = str(port)
        env["BROKER_HL7_HOST"] = "127.0.0.1"
        env["BROKER_DICOM_PORT"] = str(free_port())  # so that a running broker's 11112 does not clash
        env["BROKER_DICOM_HOST"] = "127.0.0.1"
        env["BROKER_HTTP_PORT"] = str(free_port())  # the status board and API, idle here
    return env


def inherited_broker_env() -> dict[str, str]:
    """BROKER_* variables from our environment that the broker will see besides the ones set here."""
    ours = {"BROKER_DATABASE_URL", "BROKER_LOG_LEVEL", "BROKER_HL7_PORT", "BROKER_HL7_HOST", "BROKER_DICOM_PORT",
            "BROKER_DICOM_HOST", "BROKER_HTTP_PORT"}
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("BROKER_") and k not in ours}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def migrate(database_url: str) -> None:
    result = subprocess.run([*broker_command(), "db", "upgrade"], cwd=ROOT, env=broker_env(database_url),
                            capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"'broker db upgrade' failed (exit {result.returncode}):\n"
                           f"{result.stdout}{result.stderr}".rstrip())


def broker_settings(database_url: str) -> dict[str, Any]:
    """The broker's effective settings (``broker config show``), with the database URL's password hidden."""
    from sqlalchemy.engine import make_url

    result = subprocess.run([*broker_command(), "config", "show"], cwd=ROOT, env=broker_env(database_url, 2575),
                            capture_output=True, text=True, timeout=60, check=False)
    try:
        settings: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        return {"error": (result.stdout + result.stderr).strip()[:500]}
    settings.pop("hl7_port", None)  # a free port is chosen per run
    settings["database_url"] = make_url(database_url).render_as_string(hide_password=True)
    return settings


def proc_status(pid: int, key: str) -> int | None:
    """A ``kB`` figure from /proc/<pid>/status (VmRSS, VmHWM), in bytes; None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants (the broker's worker processes, if it runs any)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return pids


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    return raw[raw.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def tree_cpu_seconds(root: int) -> float | None:
    """User + system CPU time of ``root``'s process tree: live processes plus the children it reaped."""
    ticks = 0
    try:
        fields = _stat_fields(root)
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
    except (OSError, ValueError, IndexError):
        return None
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def named_cpu_seconds(name: str) -> float:
    """User + system CPU time of every live process called ``name`` (e.g. the PostgreSQL server's)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text(encoding="ascii", errors="replace")
            if text[text.index("(") + 1:text.rindex(")")] == name:
                fields = text[text.rindex(")") + 2:].split()
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _pss(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="ascii").splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return None


class RssSampler:
    """Samples the broker's memory in a thread; :meth:`reset` starts new peaks for the next phase.

    ``main``: VmRSS of the broker process itself. ``tree``: the sum of VmRSS over it and its worker
    processes (shared pages counted once per process, so it overstates); ``tree_pss``: the sum of
    proportional set sizes (shared pages divided among their users: the fair total).
    """

    KINDS = ("main", "tree", "tree_pss")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = dict.fromkeys(self.KINDS, 0)
        self.overall_peak = dict.fromkeys(self.KINDS, 0)
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(RSS_INTERVAL)

    def sample(self) -> None:
        pids = tree_pids(self.pid)
        main = proc_status(self.pid, "VmRSS")
        if main is None:
            return
        now = {"main": main,
               "tree": sum(proc_status(p, "VmRSS") or 0 for p in pids),
               "tree_pss": sum(_pss(p) or 0 for p in pids)}
        self.max_processes = max(self.max_processes, len(pids))
        for kind, value in now.items():
            self.peak[kind] = max(self.peak[kind], value)
            self.overall_peak[kind] = max(self.overall_peak[kind], value)

    def reset(self) -> None:
        self.peak = dict.fromkeys(self.KINDS, 0)
        self.sample()

    def peaks_mb(self, overall: bool = False) -> dict[str, float]:
        return {kind: value / 2**20 for kind, value in (self.overall_peak if overall else self.peak).items()}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class ChildProcess:
    """A process the benchmark started, its output in ``log_path``: what the benchmarks ask of one (its
    pid for the CPU readings, whether it still runs, the end of its log for an error message)."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclasses.dataclass
class Broker(ChildProcess):
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path


def start_broker(database_url: str, workdir: Path) -> Broker:
    port = free_port()
    log_path = workdir / "broker.log"
    with open(log_path, "wb") as log:
        # Its own session (and process group): a Ctrl-C at the terminal reaches only this script, which then
        # stops the broker with SIGTERM, as an init system would; and its worker processes can be killed
        # as a group if it does not stop.
        process = subprocess.Popen([*broker_command(), "run"], cwd=ROOT, env=broker_env(database_url, port),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    broker = Broker(process, port, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if not broker.alive():
            raise RuntimeError(f"broker exited with status {process.returncode} before listening:\n"
                               f"{broker.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return broker
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_broker(broker)
            raise RuntimeError(f"broker did not accept connections on port {port} within {START_TIMEOUT:.0f} s:\n"
                               f"{broker.log_tail()}")
        time.sleep(0.1)


def _kill_group(pgid: int) -> bool:
    """SIGKILL whatever is left in the broker's process group; True if anything was."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_broker(broker: Broker) -> dict[str, Any]:
    """SIGTERM, then SIGKILL (of its whole process group) after STOP_TIMEOUT; returns how it ended."""
    started = time.monotonic()
    if not broker.alive():
        how = "exited by itself"
    else:
        broker.process.terminate()
        try:
            broker.process.wait(timeout=STOP_TIMEOUT)
            how = "SIGTERM"
        except subprocess.TimeoutExpired:
            _kill_group(broker.pid)
            broker.process.wait(timeout=STOP_TIMEOUT)
            how = f"SIGKILL (still running {STOP_TIMEOUT:.0f} s after SIGTERM)"
    # Worker processes that outlived the broker (the group id is the broker's pid: start_new_session).
    leftovers = _kill_group(broker.pid)
    return {"exit_status": broker.process.returncode, "stopped_by": how,
            "stop_seconds": round(time.monotonic() - started, 3), "killed_leftover_processes": leftovers}


# --------------------------------------------------------------------------------------------------
# databases


@contextlib.contextmanager
def fresh_database(backend: str, pg_url: str, workdir: Path) -> Iterator[str]:
    """Yields the SQLAlchemy URL of a new, empty database; a PostgreSQL one is dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'broker.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "bench_" + "".join(random.choices(string.ascii_lowercase + string.digits, k=10))
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                try:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                except Exception:  # PostgreSQL < 13 has no FORCE
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            print(f"  dropped database {name}", flush=True)
    finally:
        admin.dispose()


# --------------------------------------------------------------------------------------------------
# load generators


@dataclasses.dataclass
class Outcomes:
    """What happened to the messages of one run (shared by its connection threads)."""

    acked_aa: int = 0
    not_aa: int = 0
    errors: int = 0
    unsent: int = 0
    first_bad: str = ""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def bad(self, kind: str, detail: str) -> None:
        with self.lock:
            if kind == "not_aa":
                self.not_aa += 1
            else:
                self.errors += 1
            if not self.first_bad:
                self.first_bad = f"{kind}: {detail}"
                print(f"    first failure ({kind}): {detail}", flush=True)

    @property
    def failed(self) -> int:
        return self.not_aa + self.errors + self.unsent


def _show_ack(reply: bytes) -> str:
    return reply.decode("latin-1").replace("\r", "\\r ")[:600]


def _check_reply(reply: bytes, outcomes: Outcomes) -> None:
    if b"MSA|AA" in reply:
        with outcomes.lock:
            outcomes.acked_aa += 1
    else:
        outcomes.bad("not_aa", _show_ack(reply))


def _connection_worker(port: int, messages: list[bytes], latencies: list[float], outcomes: Outcomes,
                       ready: threading.Barrier, abort: threading.Event) -> None:
    from broker.hl7.mllp_client import MLLPClient, MLLPError

    client = MLLPClient("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    sent = 0
    try:
        try:
            client.connect()
        except MLLPError as exc:
            outcomes.bad("error", str(exc))
        ready.wait()
        consecutive_errors = 0
        for message in messages:
            if abort.is_set() or consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                break
            sent += 1
            started = time.perf_counter()
            reply = _send(client, message, outcomes)
            if reply is None:
                consecutive_errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            consecutive_errors = 0
            _check_reply(reply, outcomes)
    except threading.BrokenBarrierError:
        pass
    finally:
        client.close()
        with outcomes.lock:
            outcomes.unsent += len(messages) - sent


def throughput_run(broker: Broker, messages: list[bytes], connections: int, sampler: RssSampler,
                   abort: threading.Event) -> dict[str, Any]:
    per_connection = [len(messages) // connections + (1 if i < len(messages) % connections else 0)
                      for i in range(connections)]
    shares, start = [], 0
    for count in per_connection:
        shares.append(messages[start:start + count])
        start += count
    latencies: list[list[float]] = [[] for _ in range(connections)]
    outcomes = Outcomes()
    ready = threading.Barrier(connections + 1)
    threads = [threading.Thread(target=_connection_worker, name=f"mllp-{i}", daemon=True,
                                args=(broker.port, shares[i], latencies[i], outcomes, ready, abort))
               for i in range(connections)]
    for thread in threads:
        thread.start()
    sampler.reset()
    cpu_before = tree_cpu_seconds(broker.pid)
    client_cpu_before = time.process_time()
    try:
        ready.wait()  # every connection is open: start the clock
        started = time.perf_counter()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
                if not broker.alive():
                    abort.set()  # the threads stop at their next message; the caller reports the death
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu_before
    except BaseException:  # Ctrl-C: let the (daemon) threads go; stopping the broker ends their sends
        abort.set()
        ready.abort()
        raise
    cpu_after = tree_cpu_seconds(broker.pid)
    sampler.sample()
    all_latencies = [x for per in latencies for x in per]
    completed = len(all_latencies)
    return {
        "kind": "throughput",
        "messages": len(messages),
        "connections": connections,
        "wall_s": wall,
        "completed": completed,
        "messages_per_s": completed / wall if wall > 0 else math.nan,
        **latency_summary(all_latencies),
        **_outcome_fields(outcomes, cpu_before, cpu_after, client_cpu, sampler),
        "meets_target": outcomes.failed == 0 and completed / wall >= TARGET_MSGS_PER_S,
    }


def _send(client: Any, message: bytes, outcomes: Outcomes) -> bytes | None:
    """One message and its reply; a connection error or timeout is counted and gives None."""
    from broker.hl7.mllp_client import MLLPError

    try:
        reply: bytes = client.send(message)
    except MLLPError as exc:
        outcomes.bad("error", str(exc))
        return None
    return reply


def _outcome_fields(outcomes: Outcomes, cpu_before: float | None, cpu_after: float | None, client_cpu: float,
                    sampler: RssSampler) -> dict[str, Any]:
    """The fields every run reports: replies by outcome, CPU of broker and client, broker memory."""
    return {
        "acked_aa": outcomes.acked_aa,
        "not_aa": outcomes.not_aa,
        "errors": outcomes.errors,
        "unsent": outcomes.unsent,
        "first_failure": outcomes.first_bad,
        "failed": outcomes.failed > 0,
        "broker_cpu_s": (cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None else None,
        "client_cpu_s": client_cpu,
        "broker_peak_rss_mb": sampler.peaks_mb(),
    }


def rate_run(broker: Broker, messages: list[bytes], rate: float, sampler: RssSampler,
             abort: threading.Event) -> dict[str, Any]:
    from broker.hl7.mllp_client import MLLPClient

    outcomes = Outcomes()
    from_schedule: list[float] = []
    from_send: list[float] = []
    behind: list[float] = []
    sent = 0
    sampler.reset()
    cpu_before = tree_cpu_seconds(broker.pid)
    client_cpu_before = time.process_time()
    consecutive_errors = 0
    last_ack = math.nan
    with MLLPClient("127.0.0.1", broker.port, timeout=CLIENT_TIMEOUT) as client:
        t0 = time.perf_counter() + 0.05
        for i, message in enumerate(messages):
            if abort.is_set() or consecutive_errors >= MAX_CONSECUTIVE_ERRORS or not broker.alive():
                break
            due = t0 + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sent += 1
            send_at = time.perf_counter()
            reply = _send(client, message, outcomes)
            if reply is None:
                consecutive_errors += 1
                continue
            last_ack = time.perf_counter()
            consecutive_errors = 0
            from_schedule.append(last_ack - due)
            from_send.append(last_ack - send_at)
            behind.append(max(0.0, send_at - due))
            _check_reply(reply, outcomes)
    outcomes.unsent = len(messages) - sent
    client_cpu = time.process_time() - client_cpu_before
    cpu_after = tree_cpu_seconds(broker.pid)
    sampler.sample()
    completed = len(from_send)
    duration = last_ack - t0 if completed else math.nan
    sched = latency_summary(from_schedule)
    return {
        "kind": "fixed_rate",
        "offered_rate": rate,
        "messages": len(messages),
        "connections": 1,
        "completed": completed,
        "wall_s": duration,
        "achieved_rate": completed / duration if completed and duration > 0 else math.nan,
        "from_schedule": sched,
        "from_send": latency_summary(from_send),
        "late_sends": sum(1 for b in behind if b > 0.001),
        "max_behind_schedule_ms": max(behind) * 1000.0 if behind else math.nan,
        **_outcome_fields(outcomes, cpu_before, cpu_after, client_cpu, sampler),
        "meets_target": (outcomes.failed == 0 and sched["p99_ms"] < TARGET_P99_MS) if rate == TARGET_RATE else None,
    }


# --------------------------------------------------------------------------------------------------
# one backend


def log_problems(log_path: Path, limit: int = 5) -> dict[str, Any]:
    """Counts warning/error/critical lines in the broker's output (JSON or plain) and keeps the first few."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {"lines": 0, "problems": 0, "first": []}
    problems = []
    events: dict[str, int] = {}
    for line in lines:
        level = ""
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(line)
            level = str(entry.get("level", "")).lower()
            key = f"{level} {entry.get('event', '?')}" + (f" ({entry['error']})" if "error" in entry else "")
            events[key] = events.get(key, 0) + 1
        if level in {"warning", "error", "critical", "exception"} or (not level and line.strip()):
            problems.append(line)
    return {"lines": len(lines), "problems": len(problems), "events": events,
            "first": [p[:500] for p in problems[:limit]]}


def run_backend(backend: str, args: argparse.Namespace, factory: MessageFactory, results_dir: Path, stamp: str,
                results: list[dict[str, Any]]) -> None:
    """Runs every benchmark on one backend; its record is appended to ``results`` first, so that an
    interrupted backend still reports the runs it finished."""
    print(f"\n=== {backend} ===", flush=True)
    result: dict[str, Any] = {"backend": backend, "runs": []}
    results.append(result)
    workdir = Path(tempfile.mkdtemp(prefix=f"hl7bench-{backend}-"))
    abort = threading.Event()
    try:
        with fresh_database(backend, args.pg_url, workdir) as url:
            from sqlalchemy.engine import make_url

            result["database"] = make_url(url).render_as_string(hide_password=True)
            print(f"  database {result['database']}", flush=True)
            started = time.perf_counter()
            migrate(url)
            print(f"  migrated in {time.perf_counter() - started:.1f} s", flush=True)
            result["broker_settings"] = broker_settings(url)

            # Build every message of this backend before the broker starts (and before any clock runs).
            batches = [factory.build(args.messages) for _ in args.connections]
            rate_messages = factory.build(round(args.rate * args.rate_seconds)) if args.rate > 0 else []

            broker = start_broker(url, workdir)
            sampler = RssSampler(broker.pid)
            sampler.start()
            print(f"  broker pid {broker.pid} listening on 127.0.0.1:{broker.port}", flush=True)
            try:
                for connections, batch in zip(args.connections, batches, strict=True):
                    print(f"  throughput: {len(batch)} messages over {connections} connection(s) ...", flush=True)
                    run = throughput_run(broker, batch, connections, sampler, abort)
                    result["runs"].append(run)
                    print(f"    {run['messages_per_s']:.1f} msg/s, p50 {run['p50_ms']:.1f} ms, "
                          f"p99 {run['p99_ms']:.1f} ms, not AA {run['not_aa']}, errors {run['errors']}, "
                          f"unsent {run['unsent']}", flush=True)
                    if not broker.alive():
                        raise RuntimeError(f"broker died (exit {broker.process.returncode}):\n{broker.log_tail()}")
                if rate_messages:
                    print(f"  fixed rate: {args.rate:g} msg/s for {args.rate_seconds:g} s "
                          f"({len(rate_messages)} messages) ...", flush=True)
                    run = rate_run(broker, rate_messages, args.rate, sampler, abort)
                    result["runs"].append(run)
                    print(f"    achieved {run['achieved_rate']:.1f} msg/s, p99 from schedule "
                          f"{run['from_schedule']['p99_ms']:.1f} ms, not AA {run['not_aa']}, "
                          f"errors {run['errors']}, unsent {run['unsent']}", flush=True)
                    if not broker.alive():
                        raise RuntimeError(f"broker died (exit {broker.process.returncode}):\n{broker.log_tail()}")
            finally:
                abort.set()
                hwm = proc_status(broker.pid, "VmHWM") if broker.alive() else None
                sampler.stop()
                result["broker_stop"] = stop_broker(broker)
                result["broker_peak_rss_mb"] = sampler.peaks_mb(overall=True)
                result["broker_max_processes"] = sampler.max_processes
                result["broker_vmhwm_mb"] = hwm / 2**20 if hwm is not None else None
                result["broker_log"] = log_problems(broker.log_path)
                if result["broker_log"]["lines"]:
                    saved = results_dir / f"hl7-{stamp}-{backend}-broker.log"
                    results_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(broker.log_path, saved)
                    result["broker_log"]["saved_as"] = str(saved)
                print(f"  broker stopped by {result['broker_stop']['stopped_by']}, "
                      f"exit status {result['broker_stop']['exit_status']}", flush=True)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  FAILED: {result['error']}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# machine facts and report


def calibrate() -> float:
    """Best of three timings of a 10-million-iteration pure-Python loop, in seconds."""
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return best


def _first_line_with(path: str, prefix: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return ""


def _git(*args: str) -> str:
    # Read-only; --no-optional-locks keeps 'status' from refreshing (writing) the index.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False)
        if done.returncode == 0:
            return done.stdout.rstrip()
    return ""


def machine_facts() -> dict[str, Any]:
    from broker import __version__

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": _first_line_with("/proc/cpuinfo", "model name"),
        "memory_total": _first_line_with("/proc/meminfo", "MemTotal"),
        "loadavg_before": os.getloadavg(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "broker_version": __version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_modified_files": status.splitlines() if status else [],
        "calibration_loop_10m_s": calibrate(),
    }


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def _runs_of(report: dict[str, Any], kind: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(backend, run) for every run of ``kind`` ("throughput" or "fixed_rate"), in report order."""
    for backend in report["backends"]:
        for run in backend["runs"]:
            if run["kind"] == kind:
                yield backend, run


def print_report(report: dict[str, Any]) -> None:
    facts = report["machine"]
    print("\n" + "=" * 118)
    print(f"HL7 intake benchmark  {report['started']}  nproc {facts['nproc']}  Python {facts['python']}  "
          f"calibration (10M-iteration loop) {facts['calibration_loop_10m_s']:.3f} s")
    if facts["git_modified_files"]:
        print(f"working tree has {len(facts['git_modified_files'])} modified tracked file(s) "
              f"(commit {facts['git_commit'][:12]})")
    print("\nThroughput (back to back, each connection waits for every ACK)"
          f"      target: {TARGET_TEXT[0]}")
    header = (f"{'backend':<11}{'msgs':>7}{'conn':>5}{'wall s':>9}{'msg/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
              f"{'p99 ms':>9}{'max ms':>9}{'non-AA':>8}{'errors':>7}{'mem MB':>8}{'CPU s':>7}{'cli CPU':>8}  target")
    print(header)
    print("-" * len(header))
    for backend, run in _runs_of(report, "throughput"):
        print(f"{backend['backend']:<11}{run['messages']:>7}{run['connections']:>5}{_fmt(run['wall_s'], '.2f'):>9}"
              f"{_fmt(run['messages_per_s']):>9}{_fmt(run['p50_ms']):>9}{_fmt(run['p95_ms']):>9}"
              f"{_fmt(run['p99_ms']):>9}{_fmt(run['max_ms']):>9}{run['not_aa']:>8}"
              f"{run['errors'] + run['unsent']:>7}{_fmt(run['broker_peak_rss_mb']['tree_pss'], '.0f'):>8}"
              f"{_fmt(run['broker_cpu_s']):>7}{_fmt(run['client_cpu_s']):>8}  {_verdict(run['meets_target'])}")
    print("\nFixed rate (one connection, scheduled sends; latency from scheduled / actual send time)"
          f"      target: {TARGET_TEXT[1]}")
    header = (f"{'backend':<11}{'offered':>8}{'achieved':>9}{'msgs':>6}{'sched p50':>10}{'sched p99':>10}"
              f"{'sched max':>10}{'send p50':>9}{'send p99':>9}{'send max':>9}{'late':>6}{'non-AA':>7}"
              f"{'errors':>7}  target")
    print(header)
    print("-" * len(header))
    for backend, run in _runs_of(report, "fixed_rate"):
        sched, sent = run["from_schedule"], run["from_send"]
        print(f"{backend['backend']:<11}{_fmt(run['offered_rate'], '.0f'):>8}{_fmt(run['achieved_rate']):>9}"
              f"{run['messages']:>6}{_fmt(sched['p50_ms']):>10}{_fmt(sched['p99_ms']):>10}"
              f"{_fmt(sched['max_ms']):>10}{_fmt(sent['p50_ms']):>9}{_fmt(sent['p99_ms']):>9}"
              f"{_fmt(sent['max_ms']):>9}{run['late_sends']:>6}{run['not_aa']:>7}"
              f"{run['errors'] + run['unsent']:>7}  {_verdict(run['meets_target'])}")
    print()
    for backend in report["backends"]:
        name = backend["backend"]
        if "error" in backend:
            print(f"{name}: FAILED: {backend['error']}")
        for run in backend["runs"]:
            if run["first_failure"]:
                print(f"{name} {run['kind']} C={run['connections']}: first failure: {run['first_failure']}")
        log = backend.get("broker_log")
        if log and log["problems"]:
            print(f"{name}: broker logged {log['problems']} warning/error/other line(s); first: {log['first'][0]}")
            if log["events"]:
                print(f"{name}: broker log events: {log['events']}")
            if "saved_as" in log:
                print(f"{name}: broker output saved as {log['saved_as']}")
        stop = backend.get("broker_stop")
        if stop and (stop["stopped_by"] != "SIGTERM" or stop["exit_status"] not in (0, -signal.SIGTERM)):
            print(f"{name}: broker stop: {stop}")
        if backend.get("broker_peak_rss_mb"):
            peaks = backend["broker_peak_rss_mb"]
            print(f"{name}: broker memory peaks: {peaks['tree_pss']:.0f} MB PSS over "
                  f"{backend['broker_max_processes']} process(es) (RSS sum {peaks['tree']:.0f} MB); "
                  f"main process {peaks['main']:.0f} MB (VmHWM {_fmt(backend.get('broker_vmhwm_mb'), '.0f')} MB)")
        if backend.get("broker_settings"):
            shown = {k: backend["broker_settings"].get(k) for k in ("hl7_workers", "hl7_processes")
                     if k in backend["broker_settings"]}
            print(f"{name}: broker settings {shown}")
    print(f"\nresult: {'FAILED' if report['failed'] else 'ok'}  (JSON: {report['json']})")


# --------------------------------------------------------------------------------------------------
# main


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("connection counts are integers >= 1")
    return values


def _backend_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in BACKENDS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"backends are a comma-separated subset of {', '.join(BACKENDS)}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=10_000,
                        help="messages per throughput run, split over the connections (default 10000)")
    parser.add_argument("--backends", type=_backend_list, default=list(BACKENDS),
                        help="comma-separated: sqlite,postgresql (default both)")
    parser.add_argument("--connections", type=_int_list, default=[1, 4],
                        help="comma-separated connection counts, one throughput run each (default 1,4)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="messages/s offered in the fixed-rate run; 0 skips it (default 100)")
    parser.add_argument("--rate-seconds", type=float, default=30.0,
                        help="duration of the fixed-rate run (default 30)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default bench/results/hl7-<timestamp>.json)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL,
                        help=f"PostgreSQL server (any database on it) where bench_<random> is created "
                             f"(default {DEFAULT_PG_URL})")
    parser.add_argument("--seed", type=int, default=None, help="seed for run tag and patient choice")
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages must be >= 1")
    if args.rate < 0 or args.rate_seconds <= 0:
        parser.error("--rate must be >= 0 and --rate-seconds > 0")
    return args


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, even if SIGINT was inherited as ignored (a background
    job): a benchmark then stops its broker and drops its database on the way out."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path: Path = args.json or ROOT / "bench" / "results" / f"hl7-{stamp}.json"
    results_dir = json_path.parent

    factory = MessageFactory(SAMPLE.read_bytes(), args.seed)
    print(f"run tag {factory.tag}; calibrating ...", flush=True)
    report: dict[str, Any] = {
        "benchmark": "hl7_throughput",
        "started": started.isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        "settings": {"messages": args.messages, "backends": args.backends, "connections": args.connections,
                     "rate": args.rate, "rate_seconds": args.rate_seconds, "pg_url": args.pg_url,
                     "sample": str(SAMPLE), "patients": PATIENTS, "run_tag": factory.tag,
                     "inherited_broker_env": inherited_broker_env()},
        "targets": {"throughput": TARGET_TEXT[0], "latency": TARGET_TEXT[1]},
        "machine": machine_facts(),
        "backends": [],
        "json": str(json_path),
    }
    if report["settings"]["inherited_broker_env"]:
        print(f"note: the broker inherits {report['settings']['inherited_broker_env']}", flush=True)
    interrupted = False
    try:
        for backend in args.backends:
            run_backend(backend, args, factory, results_dir, stamp, report["backends"])
    except KeyboardInterrupt:
        interrupted = True
        if report["backends"]:
            report["backends"][-1]["error"] = "interrupted"
        print("\ninterrupted: the broker was stopped and the database removed", flush=True)
    report["interrupted"] = interrupted
    report["failed"] = interrupted or any(
        "error" in b or any(r["failed"] for r in b["runs"]) for b in report["backends"])
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print_report(report)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
