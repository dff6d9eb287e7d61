"""The ``broker`` command as an operator uses it: migrate, run, send with any MLLP client, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from broker.hl7.mllp_client import MLLPClient, MLLPError
from tests.conftest import ROOT, sample
from tests.hl7_support import msa_code
from tests.ports import free_port

pytestmark = pytest.mark.integration
BROKER = [sys.executable, "-m", "broker"]



def env_for(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_DATABASE_URL=database_url, BROKER_HL7_HOST="127.0.0.1", BROKER_LOG_FORMAT="json", **extra)
    return env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def wait_for_port(port: int, process: subprocess.Popen[str], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"broker exited: {process.stderr.read() if process.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("broker did not start listening")


@contextmanager
def broker_run(env: dict[str, str], *ports: int, stderr: Any = subprocess.PIPE) -> Iterator[subprocess.Popen[str]]:
    """``broker run`` with ``env`` on a migrated database, once it listens on ``ports``; at the end SIGTERM,
    and SIGKILL if it has not stopped within 30 s."""
    assert run_cli("db", "upgrade", env=env).returncode == 0
    process = subprocess.Popen([*BROKER, "run"], cwd=ROOT, env=env, stderr=stderr, text=True)
    try:
        for port in ports:
            wait_for_port(port, process)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def started(database_url: str, request: pytest.FixtureRequest) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    processes = getattr(request, "param", "0")
    port, http_port = free_port(), free_port()
    env = env_for(database_url, BROKER_HL7_PORT=str(port), BROKER_HL7_PROCESSES=processes,
                  BROKER_DICOM_PORT=str(free_port()), BROKER_HTTP_PORT=str(http_port))
    # The HTTP server is the last thing started before the SIGTERM handler: a test's SIGTERM earlier
    # would kill the broker (-15) instead of stopping it. Its own port also avoids a clash on 8080.
    with broker_run(env, port, http_port) as process:
        yield port, process


def local_port(client: MLLPClient) -> int:
    """The client side's port of ``client``'s open connection."""
    assert client._sock is not None, "the client is not connected"
    return int(client._sock.getsockname()[1])


def broker_processes(parent: int) -> list[int]:
    """``parent`` and its child processes (intake and other worker processes)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(stat.parent.name))
    return [parent, *children]


def serving_processes(port: int, client_ports: list[int], parent: int, seconds: float = 10) -> dict[int, int]:
    """For each of ``client_ports``: the pid of the one broker process holding the server side of that
    connection to ``port`` (read from /proc: which process really serves it)."""
    deadline = time.monotonic() + seconds
    while True:
        inodes: dict[str, int] = {}
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
            if local == port and remote in client_ports and fields[9] != "0":
                inodes[f"socket:[{fields[9]}]"] = remote
        holders: dict[int, set[int]] = {client: set() for client in client_ports}
        for pid in broker_processes(parent):
            for fd in Path(f"/proc/{pid}/fd").glob("*"):
                with suppress(OSError):
                    target = os.readlink(fd)
                    if target in inodes:
                        holders[inodes[target]].add(pid)
        if all(len(pids) == 1 for pids in holders.values()):
            return {client: next(iter(pids)) for client, pids in holders.items()}
        # The listener holds an accepted socket for a moment before it has handed it off.
        assert time.monotonic() < deadline, f"connections not held by exactly one process: {holders}"
        time.sleep(0.1)


@pytest.mark.parametrize("started", ["0", "2"], indirect=True, ids=["threads", "worker-processes"])
def test_broker_run_takes_the_samples(started: tuple[int, subprocess.Popen[str]]) -> None:
    port, process = started
    with MLLPClient("127.0.0.1", port) as client:
        codes = [msa_code(client.send(sample(name))) for name in (
            "orm_o01_new.hl7", "orm_o01_reschedule.hl7", "adt_a08_update.hl7", "adt_a40_merge.hl7",
            "orm_o01_cancel.hl7")]
    assert codes == ["AA"] * 5
    with MLLPClient("127.0.0.1", port) as client:
        assert msa_code(client.send(sample("orm_o01_bad_fields.hl7"))) == "AE"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert process.stderr is not None
    log = process.stderr.read()
    assert '"event": "broker.stopped"' in log
    assert "MÜLLER" not in log and "ERIKA" not in log  # no patient names in the logs


@pytest.mark.parametrize("started", ["1"], indirect=True, ids=["one-worker-process"])
def test_a_killed_worker_process_is_replaced(started: tuple[int, subprocess.Popen[str]]) -> None:
    """An intake process serves whole connections, so its connections die with it; the sender reconnects
    and resends, a replacement process serves the new connection, and a resent message that had been
    answered gets its original ACK."""
    port, process = started
    with MLLPClient("127.0.0.1", port) as client:
        first_ack = client.send(sample("orm_o01_new.hl7"))
        assert msa_code(first_ack) == "AA"
        (victim,) = serving_processes(port, [local_port(client)], process.pid).values()
        assert victim != process.pid, "the connection should be served by an intake process"
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(MLLPError):  # the kernel closed the connection with its process
            client.send(sample("adt_a08_update.hl7"))
    deadline = time.monotonic() + 90
    while True:  # as a sender does: reconnect and resend until answered
        try:
            with MLLPClient("127.0.0.1", port, timeout=60) as client:
                assert client.send(sample("orm_o01_new.hl7")) == first_ack
                assert msa_code(client.send(sample("adt_a08_update.hl7"))) == "AA"
                (replacement,) = serving_processes(port, [local_port(client)], process.pid).values()
            break
        except MLLPError:  # refused while no intake process was running
            assert time.monotonic() < deadline, "no intake process took the connection again"
            time.sleep(0.5)
    assert replacement not in (victim, process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert process.stderr is not None
    log = process.stderr.read()
    assert '"event": "hl7.worker_process_died"' in log and '"event": "broker.stopped"' in log


def test_run_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    result = run_cli("run", env=env_for(f"sqlite:///{tmp_path / 'empty.db'}", BROKER_HL7_PORT=str(free_port())))
    assert result.returncode == 2
    assert result.stderr.strip() == "broker: the database schema is not current: run 'broker db upgrade' first"


def test_bad_setting_stops_startup_with_one_line(tmp_path: Path) -> None:
    result = run_cli("run", env=env_for(f"sqlite:///{tmp_path / 'x.db'}", BROKER_HL7_PORT="not-a-port"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "BROKER_HL7_PORT='not-a-port'" in lines[0]


def test_mapping_test_prints_the_items_without_storing(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    result = run_cli("mapping", "test", str(ROOT / "samples/hl7/omi_o23_two_steps.hl7"),
                     env=env_for(f"sqlite:///{db}"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("--- worklist item") == 2
    assert "NGUYỄN^LINH^^MS" in out and "SPS501A" in out and "SPS501B" in out and "MR2" in out
    assert "ISO_IR 192" in out
    assert not db.exists()


def test_mapping_test_shows_the_problems(tmp_path: Path) -> None:
    result = run_cli("mapping", "test", str(ROOT / "samples/hl7/orm_o01_bad_fields.hl7"),
                     env=env_for(f"sqlite:///{tmp_path / 'x.db'}"))
    assert result.returncode == 0
    assert "ERR 102 PID-7" in result.stdout and "ERR 101 OBR-18" in result.stdout


def test_mapping_test_json(tmp_path: Path) -> None:
    import json

    result = run_cli("mapping", "test", "--json", str(ROOT / "samples/hl7/orm_o01_new.hl7"),
                     env=env_for(f"sqlite:///{tmp_path / 'x.db'}"))
    items = json.loads(result.stdout[result.stdout.index("["):])
    assert items[0]["00080050"]["Value"] == ["ACC77001"]
