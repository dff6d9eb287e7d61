"""``broker run`` tells the UPS subscribers when it goes down and when it is back (SCP Status Change,
N-EVENT-REPORT type 4), with a real broker process and a pynetdicom subscriber."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.dicom_support import free_port, wait_until
from tests.integration.test_cli import BROKER, ROOT, env_for, run_cli, wait_for_port
from tests.integration.test_ups_events import Subscriber
from tests.integration.test_ups_scp import GLOBAL, SUBSCRIBE, action, ups_scu

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_subscribers_hear_going_down_and_restarted(tmp_path: Path) -> None:
    subscriber = Subscriber("SUBSCRIBER").start()
    dicom_port = free_port()
    env = env_for(f"sqlite:///{tmp_path / 'broker.db'}", BROKER_HL7_PORT=str(free_port()),
                  BROKER_DICOM_PORT=str(dicom_port), BROKER_DICOM_HOST="127.0.0.1", BROKER_REDIS_URL="",
                  BROKER_DICOM_PEERS=subscriber.peer(), BROKER_HTTP_PORT="0")
    assert run_cli("db", "upgrade", env=env).returncode == 0

    log = tmp_path / "broker.log"

    def start() -> subprocess.Popen[str]:
        offset = log.stat().st_size if log.exists() else 0
        with log.open("a") as sink:
            process = subprocess.Popen([*BROKER, "run"], cwd=ROOT, env=env, stderr=sink, text=True)
        wait_for_port(dicom_port, process)
        # SIGTERM is handled from the moment the RESTARTED reports are queued
        wait_until(lambda: '"broker.started"' in log.read_text()[offset:], what="broker.started")
        return process

    def stop(process: subprocess.Popen[str]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0
        except subprocess.TimeoutExpired:
            process.kill()
            raise

    try:
        process = start()
        try:
            scu = ups_scu(dicom_port, "MONITOR")
            try:
                assert int(action(scu, GLOBAL, SUBSCRIBE, ReceivingAE="SUBSCRIBER", DeletionLock="FALSE").Status) == 0
            finally:
                scu.release()
        finally:
            stop(process)
        # Delivered before the broker stopped (ups_shutdown_wait).
        assert [(r.event_type, r.uid, str(r.info.SCPStatus)) for r in subscriber.received] == [
            (4, GLOBAL, "GOING DOWN")]
        process = start()
        try:
            wait_until(lambda: len(subscriber.received) >= 2, what="the RESTARTED report")
            last = subscriber.received[-1]
            assert (last.event_type, str(last.info.SCPStatus), str(last.info.UnifiedProcedureStepListStatus)) == \
                (4, "RESTARTED", "WARM START")
        finally:
            stop(process)
    finally:
        subscriber.stop()
