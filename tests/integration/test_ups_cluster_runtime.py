"""Two ``broker run`` nodes on one database: one node stopping does not tell the UPS subscribers that the
SCP is going down, the last one does; a node starting beside a live one does not say RESTARTED.
Real processes, a pynetdicom subscriber (single-node start and stop: test_ups_runtime)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dicom_support import free_port, wait_until
from tests.integration.test_cli import BROKER, ROOT, env_for, run_cli, wait_for_port
from tests.integration.test_ups_events import Subscriber
from tests.integration.test_ups_scp import GLOBAL, SUBSCRIBE, action, ups_scu

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_one_node_of_two_stopping_leaves_the_scp_up(tmp_path: Path) -> None:
    subscriber = Subscriber("SUBSCRIBER").start()
    database = f"sqlite:///{tmp_path / 'broker.db'}"
    assert run_cli("db", "upgrade", env=env_for(database)).returncode == 0
    processes: dict[str, subprocess.Popen[str]] = {}
    ports: dict[str, int] = {}

    def start(name: str) -> None:
        ports[name] = free_port()
        env = env_for(database, BROKER_HL7_PORT=str(free_port()), BROKER_DICOM_PORT=str(ports[name]),
                      BROKER_DICOM_HOST="127.0.0.1", BROKER_REDIS_URL="", BROKER_DICOM_PEERS=subscriber.peer(),
                      BROKER_HTTP_PORT="0", BROKER_NODE_ID=name, BROKER_CLUSTER_HEARTBEAT_INTERVAL="1")
        log = tmp_path / f"{name}.log"
        with log.open("a") as sink:
            processes[name] = subprocess.Popen([*BROKER, "run"], cwd=ROOT, env=env, stderr=sink, text=True)
        wait_for_port(ports[name], processes[name])
        wait_until(lambda: '"broker.started"' in log.read_text(), what=f"{name} started")
        wait_until(lambda: '"cluster.node_joined"' in log.read_text(), what=f"{name} joined")

    def stop(name: str) -> None:
        process = processes.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0
        except subprocess.TimeoutExpired:
            process.kill()
            raise

    def statuses() -> list[str]:
        return [str(r.info.SCPStatus) for r in subscriber.received if r.event_type == 4]

    try:
        start("node-a")
        scu = ups_scu(ports["node-a"], "MONITOR")
        try:
            assert int(action(scu, GLOBAL, SUBSCRIBE, ReceivingAE="SUBSCRIBER", DeletionLock="FALSE").Status) == 0
        finally:
            scu.release()
        start("node-b")  # a is live: no RESTARTED
        stop("node-a")  # b serves on: no GOING DOWN
        time.sleep(2)  # what would have been queued had time to arrive
        assert statuses() == []
        stop("node-b")  # the last node
        assert statuses() == ["GOING DOWN"]  # delivered before it stopped (ups_shutdown_wait)
        start("node-a")
        wait_until(lambda: statuses() == ["GOING DOWN", "RESTARTED"], what="RESTARTED")
        stop("node-a")
    finally:
        for process in processes.values():
            process.kill()
        subscriber.stop()
