"""A full UPS cycle with a second, independent DICOM implementation: dcmjs-dimse (Node.js, npm) as
UPS SCU and as event receiver, against the broker's real HL7 listener, DICOM server and event path.

Subscribe globally -> an HL7 order over MLLP creates the step -> the node client finds it by
accession (UPS C-FIND), claims it, reports progress, completes it, reads it back (N-GET), and the
N-EVENT-REPORTs it received are checked (the first: the new step's State Report SCHEDULED). The
script is tests/js/ups_cycle.js; its node modules come from ``npm ci --prefix tests/js`` (``make
test`` runs it; so does this test when they are missing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from broker.events.wiring import EventPath
from broker.hl7.mllp import MLLPServer, run_in_thread
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from tests.conftest import ROOT
from tests.dicom_support import dicom_server, free_port
from tests.events_support import procedure_state, rows
from tests.integration.test_ups_scp import ups_settings
from tests.mwl_support import Order, send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

JS = ROOT / "tests" / "js"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the test's node modules installed (npm ci from the lock file)."""
    binary = shutil.which("node")
    assert binary, "node is not installed: run tests/ensure_services.sh (installs Debian nodejs npm)"
    if not (JS / "node_modules" / "dcmjs-dimse").exists():
        subprocess.run(["npm", "ci", "--prefix", str(JS), "--no-audit", "--no-fund"], check=True, timeout=300)
    return binary


@pytest.fixture
def receiver_port() -> int:
    return free_port()


@pytest.fixture
def broker(engine: Engine, database_url: str, mappings: MappingSet, receiver_port: int) -> Iterator[tuple[int, int]]:
    """(HL7 port, DICOM port) of a broker whose peers name the node receiver JSSUB."""
    settings = ups_settings(database_url, f"JSSUB@127.0.0.1:{receiver_port}", event_backoff_base=0.2,
                            event_backoff_max=1, event_poll_interval=0.1)
    hl7 = run_in_thread(MLLPServer(Intake(engine, mappings), host="127.0.0.1", port=0, workers=2))
    path = EventPath.start(settings, engine)
    try:
        with dicom_server(settings, database_url, path.workflow) as server:
            yield hl7.port, server.port
    finally:
        path.stop()
        hl7.stop()


def test_full_ups_cycle_with_dcmjs_dimse(node: str, engine: Engine, broker: tuple[int, int],
                                        receiver_port: int) -> None:
    hl7_port, dicom_port = broker
    client = subprocess.Popen([node, str(JS / "ups_cycle.js"), str(dicom_port), str(receiver_port)], cwd=JS,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "SUBSCRIBED"
        order = Order("JS1", "CT01", "CT", name="DOE^JANE")
        send(hl7_port, order)  # the RIS's order over MLLP, answered AA
        client.stdin.write("AJS1\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert "error" not in result, result.get("error", "") + err
    assert result["subscribe"] == 0x0000
    assert result["found"] == 1
    assert (result["claim"], result["claimAgain"]) == (0x0000, 0xC302)
    assert (result["progress"], result["final"]) == (0x0000, 0x0000)
    assert (result["completeWrongUid"], result["complete"]) == (0xC301, 0x0000)
    assert (result["get"], result["state"]) == (0x0000, "COMPLETED")
    events = [(e["type"], e["state"], e["progress"]) for e in result["events"] if e["uid"] == result["uid"]]
    # The global subscription hears of the step the HL7 order created (SCHEDULED), then of each change.
    assert events == [(1, "SCHEDULED", None), (1, "IN PROGRESS", None), (3, "", 60), (1, "COMPLETED", None)]
    # One model: the HL7 order's procedure followed the UPS.
    from broker.store.tables import ScheduledStep

    [step] = rows(engine, ScheduledStep, ups_instance_uid=result["uid"])
    assert step.sps_status == "COMPLETED" and step.accession_number == "AJS1"
    assert procedure_state(engine, step.procedure_fk) == "COMPLETED"
