"""A pynetdicom requestor gets every response the peer sends, however late its reactor thread runs.

pynetdicom's reactor can pass its pause checkpoint just before a ``send_*`` call closes it, then take
that call's response off the DIMSE queue and drop it; the call times out although the response arrived
(a loopback capture showed it leave the broker whole, in order, and acknowledged). Under CPU load the
reactor and the calling thread wait for the interpreter lock long enough for that to happen about once
in a thousand requests; here every request meets the worst interleaving: the caller closes the
checkpoint just after the reactor passed it, and reaches its wait for the response after the reactor
has looked at the queue. :mod:`broker.outbound.requestor_responses` (installed for the broker's own
forwards and commitment requests, and for every test's pynetdicom client by ``tests/conftest.py``)
keeps responses for the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider

from broker.config import Peer
from broker.dicom.server import DicomServer
from broker.dicom.workflow import build_workflow
from broker.outbound.dicom_peers import forward_mpps
from broker.store import migrate
from broker.store.session import make_engine
from tests.dicom_support import MppsPeer, dicom_server
from tests.events_support import mpps_create, mpps_final
from tests.integration.test_ups_scp import change_state, ups_scu, ups_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REACTOR_DELAY = 0.2  # longer than the broker takes to answer
CALLER_DELAY = 0.4  # longer than that


class LateReactorCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint, with the interleaving that load brings about by chance made
    certain: a caller closes it only just after the reactor has passed it, and the reactor goes on
    ``REACTOR_DELAY`` later (as a thread waiting for the interpreter lock would)."""

    def __init__(self, reactor: threading.Thread) -> None:
        super().__init__()
        self.reactor = reactor
        self.passing = threading.Event()
        self.set()

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        if threading.current_thread() is self.reactor:
            self.passing.set()
            time.sleep(REACTOR_DELAY)
            self.passing.clear()
        return passed

    def clear(self) -> None:
        if threading.current_thread() is not self.reactor:
            self.passing.wait(1.0)
        super().clear()


@pytest.fixture
def late_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pynetdicom association requested from here on gets a late reactor, and its caller reaches
    its wait for a response after the response is there (the peers' acceptors keep their pace)."""
    original_init = Association.__init__
    original_send = DIMSEServiceProvider.send_msg

    def init(self: Association, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.is_requestor:
            self._reactor_checkpoint = LateReactorCheckpoint(self)

    def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        original_send(self, primitive, context_id)
        if self.assoc.is_requestor:
            time.sleep(CALLER_DELAY)

    monkeypatch.setattr(Association, "__init__", init)
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", send_msg)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DicomServer]:
    database_url = f"sqlite:///{tmp_path / 'broker.db'}"
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    settings = ups_settings(database_url, "PERFORMER@127.0.0.1:9")
    try:
        with dicom_server(settings, database_url, build_workflow(settings, engine)) as server:
            yield server
    finally:
        engine.dispose()


def test_back_to_back_requests_to_the_broker_all_get_their_response(broker: DicomServer,
                                                                    late_threads: None) -> None:
    scu = ups_scu(broker.port, "PERFORMER")
    try:
        started = time.monotonic()
        # The broker answers each at once (no such UPS); none may be lost to the client's reactor.
        statuses = [change_state(scu, str(generate_uid()), "IN PROGRESS", str(generate_uid()))
                    for _ in range(5)]
        assert statuses == [0xC307] * 5
        assert scu.is_established
        assert time.monotonic() - started < 5  # no DIMSE timeout on the way
    finally:
        scu.release()


def test_the_brokers_mpps_forward_gets_the_peers_response(late_threads: None) -> None:
    peer = MppsPeer().start()
    try:
        target = Peer(peer.ae_title, "127.0.0.1", peer.port)
        uid = str(generate_uid())
        created: Dataset = mpps_create(str(generate_uid()), "SPS1")
        started = time.monotonic()
        # Raises PeerFailure ("no response from MPPSFWD") when the response is dropped.
        forward_mpps("BROKER", target, "N-CREATE", uid, created.to_json_dict(), timeout=10)
        forward_mpps("BROKER", target, "N-SET", uid, mpps_final("COMPLETED").to_json_dict(), timeout=10)
        assert [(operation, instance) for operation, instance, _ in peer.received] == [
            ("N-CREATE", uid), ("N-SET", uid)]
        assert time.monotonic() - started < 10
    finally:
        peer.stop()
