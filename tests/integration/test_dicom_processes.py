"""``BROKER_DICOM_PROCESSES``: several acceptor processes on one port, one association limit for all."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from broker.dicom import pdu
from broker.dicom.association import REJECT_LOCAL_LIMIT_EXCEEDED
from tests.integration.test_cli import broker_run, env_for, free_port
from tests.integration.test_dicom_acceptor import associate_raw

pytestmark = pytest.mark.integration


@pytest.fixture
def two_acceptors(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``broker run`` with two DICOM acceptor processes and a limit of two associations."""
    dicom_port = free_port()
    env = env_for(f"sqlite:///{tmp_path / 'broker.db'}", BROKER_HL7_PORT=str(free_port()),
                  BROKER_DICOM_PORT=str(dicom_port), BROKER_DICOM_HOST="127.0.0.1", BROKER_DICOM_PROCESSES="2",
                  BROKER_DICOM_MAX_ASSOCIATIONS="2")
    with broker_run(env, dicom_port) as process:
        yield dicom_port, process


def associate(port: int) -> Association:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="BROKER")


def listeners(port: int) -> set[int]:
    """PIDs of the processes listening on ``port`` (from ``ss``: ``users:(("python",pid=123,fd=7))``)."""
    output = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", output)}


def test_two_processes_listen_and_share_the_association_limit(two_acceptors: tuple[int, subprocess.Popen[str]]
                                                              ) -> None:
    port, broker = two_acceptors
    deadline = time.monotonic() + 30
    while len(listeners(port)) < 2 and time.monotonic() < deadline:  # the second process imports first
        time.sleep(0.2)
    pids = listeners(port)
    assert len(pids) == 2 and broker.pid in pids
    held = [associate(port) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        # Whichever process the kernel hands a connection to, the third association is over the shared limit.
        # Read off the wire (associate_raw says why).
        for _ in range(6):
            assert associate_raw(port) == (pdu.A_ASSOCIATE_RJ, REJECT_LOCAL_LIMIT_EXCEEDED)
    finally:
        for assoc in held:
            assoc.release()
    for _ in range(10):  # room again, and both processes answer C-ECHO
        assoc = associate(port)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
