"""A real broker cluster for the cross-node tests and the scaling benchmark: N ``broker run`` nodes and
Celery workers (``broker worker``) as processes on one PostgreSQL database and one Redis, with HAProxy in
front (its configuration rendered from ``config/haproxy/cluster.cfg.template``).

Isolation: each cluster has its own ``redis-server`` on a free port (so no task of one test reaches
another test's worker, whatever else uses the shared Redis), its own database, free ports from
``tests/ports.py``, and its processes' logs (JSON) in files of its work directory, never in the test
output. Every process is started in its own process group and ended by that group's id.

The settings make a dead node's leftovers short-lived: ``event_lease_seconds`` 3 (an outbox row a
killed node published, or a killed worker claimed, is taken over after 3 s), fast relay polling and
retries, and a 0.5 s health check interval in HAProxy (down after 2 failed checks, up after 2 good ones).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from sqlalchemy import Engine

from broker.store import migrate
from broker.store.session import make_engine
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
BROKER = [sys.executable, "-m", "broker"]
TEMPLATE = ROOT / "config" / "haproxy" / "cluster.cfg.template"
TOKEN = "cluster-read-token-0123456789"
WRITE_TOKEN = "cluster-write-token-0123456789"

# What the cluster tests need of every node and worker (each may be overridden per cluster).
TEST_SETTINGS: dict[str, str] = {
    "event_lease_seconds": "3",
    "event_poll_interval": "0.2",
    "event_backoff_base": "0.2",
    "event_backoff_max": "1",
    "event_max_attempts": "100",
    "ris_hl7_ack_timeout": "2",
    "ups_shutdown_wait": "0",
    "hl7_workers": "4",
    "log_level": "INFO",
    "api_tokens": f"{TOKEN}:read,{WRITE_TOKEN}:write",
}


def wait_until(condition: Callable[[], object], seconds: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    raise AssertionError(f"not in {seconds} s: {what}")


def _kill_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group of a process this module started (its leader is ``process``)."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)


def _end(process: subprocess.Popen[bytes] | None, seconds: float = 20) -> None:
    """SIGTERM to the group, SIGKILL after ``seconds``; children of a killed leader go with the group."""
    if process is None:
        return
    _kill_group(process, signal.SIGTERM)
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        _kill_group(process, signal.SIGKILL)
        process.wait(10)
    with suppress(ProcessLookupError):  # anything of the group still alive after its leader ended
        os.killpg(process.pid, signal.SIGKILL)


class RedisServer:
    """``redis-server`` on its own free port, without persistence, for one cluster."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_until(lambda: _connects(self.port), 10, "redis-server listening", 0.05)

    def stop(self) -> None:
        _end(self.process)
        self.process = None


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def base_env(**settings: str) -> dict[str, str]:
    """This process's environment without any BROKER_ variable, plus ``settings`` as BROKER_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update({f"BROKER_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass
class Node:
    """One ``broker run``: its ports, its environment and its log file (appended to across restarts)."""

    name: str
    env: dict[str, str]
    log: Path
    hl7_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(self.env, BROKER_HL7_PORT=str(self.hl7_port), BROKER_DICOM_PORT=str(self.dicom_port),
                   BROKER_HTTP_PORT=str(self.http_port))
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen([*BROKER, "run"], cwd=ROOT, env=env, stdout=sink,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        """``GET /readyz`` answers 200 (the HTTP server is the last listener ``broker run`` starts)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2) as answer:
                return int(answer.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, seconds: float = 60) -> None:
        def up() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
            return self.ready()

        wait_until(up, seconds, f"{self.name} ready", 0.2)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the node (its whole process group), as when its machine dies: nothing is cleaned up."""
        if self.process is not None:
            _kill_group(self.process, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        _end(self.process, 30)

    def restart(self) -> None:
        """Start again with the same settings and ports, and wait until it is ready."""
        self.start()
        self.wait_ready()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Worker:
    """One ``broker worker --concurrency 1`` (a Celery main process and its child, one process group)."""

    name: str
    env: dict[str, str]
    log: Path
    concurrency: int = 1
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen([*BROKER, "worker", "--concurrency", str(self.concurrency)], cwd=ROOT,
                                            env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def kill(self) -> None:
        if self.process is not None:
            _kill_group(self.process, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        _end(self.process)


def render_haproxy(nodes: list[Node], *, hl7_port: int, dicom_port: int, http_port: int, stats_socket: Path,
                   check_inter: str = "500ms", check_fall: int = 2, check_rise: int = 2) -> str:
    """The HAProxy configuration for ``nodes`` from the template: the HTTP servers are checked with
    ``GET /readyz``, the MLLP and DICOM servers track them."""
    def lines(port_of: Callable[[Node], int], check: str) -> str:
        return "\n".join(f"    server {n.name} 127.0.0.1:{port_of(n)} {check.format(name=n.name)}" for n in nodes)

    return Template(TEMPLATE.read_text()).substitute(
        stats_socket=str(stats_socket), bind_host="127.0.0.1", hl7_port=hl7_port, dicom_port=dicom_port,
        http_port=http_port, check_inter=check_inter, check_fall=check_fall, check_rise=check_rise,
        hl7_servers=lines(lambda n: n.hl7_port, "track http_nodes/{name}"),
        dicom_servers=lines(lambda n: n.dicom_port, "track http_nodes/{name}"),
        http_servers=lines(lambda n: n.http_port, "check"))


class HAProxy:
    """``haproxy -db`` (foreground) with a rendered configuration; reads server states from its stats socket."""

    def __init__(self, nodes: list[Node], workdir: Path) -> None:
        self.hl7_port, self.dicom_port, self.http_port = free_port(), free_port(), free_port()
        self.socket = workdir / "haproxy.sock"
        self.config = workdir / "haproxy.cfg"
        self.log = workdir / "haproxy.log"
        self.config.write_text(render_haproxy(nodes, hl7_port=self.hl7_port, dicom_port=self.dicom_port,
                                              http_port=self.http_port, stats_socket=self.socket))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, f"haproxy refused its configuration: {check.stderr}"
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=sink,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.socket.exists() and _connects(self.http_port), 10, "haproxy listening", 0.05)

    def stop(self) -> None:
        _end(self.process, 10)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(str(self.socket))
            conn.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status (``UP``, ``DOWN``, ``UP 1/2``, ...) from ``show stat``."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        at_name, at_server, at_status = header.index("pxname"), header.index("svname"), header.index("status")
        found = {}
        for line in lines[1:]:
            fields = line.split(",")
            if len(fields) > at_status and fields[at_server] not in ("FRONTEND", "BACKEND"):
                found[(fields[at_name], fields[at_server])] = fields[at_status]
        return found

    def node_state(self, node: str) -> set[str]:
        """The states of ``node`` in the three backends (one value when they agree)."""
        return {state for (_, server), state in self.states().items() if server == node}

    def wait_node(self, node: str, state: str, seconds: float = 30) -> None:
        wait_until(lambda: self.node_state(node) == {state}, seconds, f"{node} {state} in haproxy", 0.1)


@dataclass
class Cluster:
    """The running cluster: its nodes, workers, HAProxy, Redis, and an engine on its database for reads."""

    database_url: str
    engine: Engine
    workdir: Path
    redis: RedisServer
    nodes: list[Node]
    workers: list[Worker]
    haproxy: HAProxy | None

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def logs(self) -> str:
        """The tail of every log of the cluster (printed when a test fails)."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)


@contextmanager
def running_cluster(database_url: str, workdir: Path, *, nodes: int = 2, workers: int = 2, haproxy: bool = True,
                    worker_concurrency: int = 1, overrides: dict[str, str] | None = None,
                    **settings: str) -> Iterator[Cluster]:
    """Start ``nodes`` broker nodes and ``workers`` Celery workers on a migrated ``database_url`` and a Redis
    of their own, and HAProxy in front of the nodes; wait until every node is ready (and UP in HAProxy);
    stop everything at the end (also when start-up fails). ``overrides`` and ``settings`` (names as in
    ``broker/config.py``) override :data:`TEST_SETTINGS`."""
    engine = make_engine(database_url, pool_size=4)
    migrate.upgrade(engine)
    redis = RedisServer(workdir)
    redis.start()
    values = {**TEST_SETTINGS, **(overrides or {}), **settings, "database_url": database_url, "redis_url": redis.url,
              "hl7_host": "127.0.0.1", "dicom_host": "127.0.0.1", "http_host": "127.0.0.1", "log_format": "json"}
    env = base_env(**values)
    cluster = Cluster(database_url, engine, workdir, redis,
                      [Node(f"node{i}", env, workdir / f"node{i}.log") for i in range(1, nodes + 1)],
                      [Worker(f"worker{i}", env, workdir / f"worker{i}.log", worker_concurrency)
                       for i in range(1, workers + 1)], None)
    try:
        for node in cluster.nodes:
            node.start()
        for worker in cluster.workers:
            worker.start()
        for node in cluster.nodes:
            node.wait_ready()
        if haproxy:
            cluster.haproxy = HAProxy(cluster.nodes, workdir)
            cluster.haproxy.start()
            for node in cluster.nodes:
                cluster.haproxy.wait_node(node.name, "UP")
        yield cluster
    finally:
        if cluster.haproxy is not None:
            cluster.haproxy.stop()
        for node in cluster.nodes:
            node.stop()
        for worker in cluster.workers:
            worker.stop()
        redis.stop()
        engine.dispose()
