"""``broker run`` with HL7 intake processes (``BROKER_HL7_PROCESSES``): the listener passes whole
connections to them. Real processes, sockets and databases; which process serves a connection is read
from /proc."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from broker.hl7.mllp_client import MLLPClient, MLLPError
from tests.conftest import sample
from tests.hl7_support import msa_code, with_control_id
from tests.integration.test_cli import broker_run, env_for, free_port, local_port, serving_processes

pytestmark = pytest.mark.integration
READ_TOKEN = "read-token-0123456789"


@dataclass
class Broker:
    process: subprocess.Popen[str]
    port: int
    http_port: int

    def client(self) -> MLLPClient:
        return MLLPClient("127.0.0.1", self.port)

    def metrics(self) -> str:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/metrics",
                                         headers={"Authorization": f"Bearer {READ_TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return str(answer.read().decode())

    def stop(self) -> str:
        """SIGTERM; asserts exit status 0 and returns the log."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0
        assert self.process.stderr is not None
        return self.process.stderr.read()


def start(database_url: str, **settings: str) -> Iterator[Broker]:
    port, http_port = free_port(), free_port()
    env = env_for(database_url, BROKER_HL7_PORT=str(port), BROKER_HL7_PROCESSES="2",
                  BROKER_DICOM_PORT=str(free_port()), BROKER_HTTP_PORT=str(http_port),
                  BROKER_API_TOKENS=f"{READ_TOKEN}:read", **settings)
    # Ready once HTTP listens (started after the MLLP port is bound). A probe of the MLLP port would
    # count against BROKER_HL7_MAX_CONNECTIONS until its intake process reports it closed.
    with broker_run(env, http_port) as process:
        yield Broker(process, port, http_port)


@pytest.fixture
def broker(database_url: str) -> Iterator[Broker]:
    yield from start(database_url)


@pytest.fixture
def three_at_most(database_url: str) -> Iterator[Broker]:
    yield from start(database_url, BROKER_HL7_MAX_CONNECTIONS="3")


def new_order(number: int) -> bytes:
    """The sample new order made unique (control id, order numbers, accession, UIDs)."""
    raw = sample("orm_o01_new.hl7").replace(b"77001", str(number).encode())
    return with_control_id(raw, f"PROC{number}")


def test_four_connections_are_served_by_two_processes_two_each(broker: Broker) -> None:
    with ExitStack() as stack:
        clients = [stack.enter_context(broker.client()) for _ in range(4)]
        for round_ in range(3):
            codes = [msa_code(client.send(new_order(78000 + 10 * index + round_)))
                     for index, client in enumerate(clients)]
            assert codes == ["AA"] * 4
        owners = serving_processes(broker.port, [local_port(client) for client in clients], broker.process.pid)
    assert broker.process.pid not in owners.values(), "the listener must not serve connections itself"
    assert sorted(Counter(owners.values()).values()) == [2, 2]
    log = broker.stop()
    handed_off = [line for line in log.splitlines() if '"event": "hl7.connection_handed_off"' in line]
    for client_port, pid in owners.items():  # the listener's log names the process too
        assert any(f'"peer": "127.0.0.1:{client_port}"' in line and f'"pid": {pid},' in line for line in handed_off)
    assert log.count('"event": "hl7.worker_process_stopped"') == 2


def test_max_connections_counts_the_connections_of_every_process(three_at_most: Broker) -> None:
    broker = three_at_most
    with ExitStack() as stack:
        clients = [stack.enter_context(broker.client()) for _ in range(3)]
        for index, client in enumerate(clients):
            assert msa_code(client.send(new_order(79000 + index))) == "AA"
        assert len(set(serving_processes(broker.port, [local_port(c) for c in clients],
                                         broker.process.pid).values())) == 2
        with pytest.raises(MLLPError), broker.client() as fourth:  # the reset may come before connect returns
            fourth.send(new_order(79010))  # refused: 3 open, spread over two processes
        clients[0].close()  # its process reports the close; then there is room again
        deadline = time.monotonic() + 30
        while True:
            try:
                with broker.client() as late:
                    assert msa_code(late.send(new_order(79020))) == "AA"
                break
            except MLLPError:
                assert time.monotonic() < deadline, "the closed connection was never released"
                time.sleep(0.2)
    log = broker.stop()
    assert '"reason": "max_connections"' in log


def test_metrics_of_the_main_process_count_messages_handled_in_the_processes(broker: Broker) -> None:
    with broker.client() as one, broker.client() as two:
        for number in range(3):
            assert msa_code(one.send(new_order(80000 + number))) == "AA"
            assert msa_code(two.send(new_order(80100 + number))) == "AA"
        assert msa_code(one.send(sample("orm_o01_bad_fields.hl7"))) == "AE"
    pattern = re.compile(r'^broker_hl7_messages_total\{message_type="ORM\^O01",outcome="(\w+)"\} (\S+)$', re.M)
    deadline = time.monotonic() + 10
    while True:  # the processes report each message as it is answered; the listener counts them
        counted = {outcome: float(value) for outcome, value in pattern.findall(broker.metrics())}
        if counted == {"AA": 6.0, "AE": 1.0} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counted == {"AA": 6.0, "AE": 1.0}
    broker.stop()


def test_sigterm_with_an_open_connection_stops_cleanly(broker: Broker) -> None:
    with broker.client() as client:
        assert msa_code(client.send(new_order(81000))) == "AA"
        log = broker.stop()  # the connection is still open
        with pytest.raises(MLLPError):  # ... and was closed by its process
            client.send(new_order(81001))
    assert '"event": "broker.stopped"' in log
    assert log.count('"event": "hl7.worker_process_stopped"') == 2
    assert "hl7.worker_process_killed" not in log and "hl7.worker_process_died" not in log
