"""Group commit over real TCP on SQLite and PostgreSQL: messages of several connections share a
transaction, each in its own savepoint, and are answered only after the one commit.

To make a batch hold exactly the messages a test wants, :class:`HeldIntake` keeps its first batch
waiting until the others have arrived; the tests assert outcomes and stored rows, never timing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from broker.config import SettingsError, load_settings
from broker.hl7.mllp import MLLPServer, run_in_thread
from broker.hl7.mllp_client import MLLPClient, MLLPError
from broker.intake.build import build_intake
from broker.intake.service import Intake
from broker.mapping.rules import MappingSet
from broker.store.session import make_engine
from broker.store.tables import InboundMessage, Order, Patient, StepTransition
from tests.conftest import sample
from tests.hl7_support import err_fields, msa_code, steps, with_control_id

pytestmark = pytest.mark.integration

NEW = sample("orm_o01_new.hl7")
WAIT = 30.0


def order(n: int, control: str = "NW", control_id: str = "", start: str = "20261123093000") -> bytes:
    """The sample order with its own order numbers, step keys and MSH-10, and the given ORC-1."""
    raw = (with_control_id(NEW, control_id or f"GC{n:05d}{control}").replace(b"PO-77001", f"PO-{n}".encode())
           .replace(b"ACC77001", f"ACC{n}".encode()).replace(b"SPS77001", f"SPS{n}".encode())
           .replace(b"77001^WLBROKER", f"{n}^WLBROKER".encode()).replace(b"FO-77001", f"FO-{n}".encode())
           .replace(b"20261123093000", start.encode()))
    return raw.replace(b"ORC|NW|", f"ORC|{control}|".encode())


def obr(placer: str) -> bytes:
    """An OBR segment with the fields the default mapping reads, at their positions."""
    fields = [""] * 25
    fields[0], fields[1], fields[2], fields[4] = "OBR", "1", f"{placer}^CERNER", "USABD^US ABDOMEN^LOCAL"
    fields[18], fields[19], fields[20], fields[24] = f"A{placer}", f"R{placer}", f"S{placer}", "US"
    return "|".join(fields).encode() + b"\r"


def omg(control_id: str, patient_id: str, *placer_numbers: str) -> bytes:
    """An OMG^O19 with one new-order group per placer number."""
    groups = b"".join(f"ORC|NW|{placer}^CERNER|||SC\rTQ1|1||||||20261124080000||R\r".encode() + obr(placer)
                      for placer in placer_numbers)
    return (f"MSH|^~\\&|CERNER|CITYMED|WL|RAD|20261123||OMG^O19^OMG_O19|{control_id}|P|2.5.1\r"
            f"PID|1||{patient_id}^^^CITYMED^MR||PARK^JI||19900101|F\r".encode() + groups)


class HeldIntake(Intake):
    """An intake whose next batch after :meth:`hold_next` waits until :meth:`release_when_waiting`,
    so the messages sent meanwhile are handled together in the batch after it. Records the messages
    of each batch since :meth:`hold_next`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[bytes]] = []
        self.holding = threading.Event()
        self._release = threading.Event()
        self._armed = False

    def hold_next(self) -> None:
        self.batches = []
        self._armed = True

    def _run_batch(self, jobs: list[Any]) -> None:
        self.batches.append([job.raw for job in jobs])
        if self._armed:
            self._armed = False
            self.holding.set()
            assert self._release.wait(WAIT), "the test never released the held batch"
        super()._run_batch(jobs)

    def waiting(self) -> int:
        assert self._group is not None
        with self._group._lock:
            return len(self._group._waiting)

    def release_when_waiting(self, count: int) -> None:
        deadline = time.monotonic() + WAIT
        while self.waiting() < count:
            assert time.monotonic() < deadline, f"only {self.waiting()} of {count} messages arrived"
            time.sleep(0.01)
        self._release.set()


@contextmanager
def listening(intake: Intake) -> Iterator[int]:
    server = MLLPServer(intake, host="127.0.0.1", port=0, workers=8, idle_timeout=30)
    thread = run_in_thread(server)
    try:
        yield thread.port
    finally:
        thread.stop()


def send(port: int, *messages: bytes) -> list[bytes]:
    with MLLPClient("127.0.0.1", port) as client:
        return [client.send(m) for m in messages]


def in_threads(*calls: Callable[[], object]) -> list[object]:
    """Run the calls in threads at once; their results (or exceptions) in call order."""
    results: list[object] = [None] * len(calls)

    def run(index: int, call: Callable[[], object]) -> None:
        try:
            results[index] = call()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    return results


def held_batch(intake: HeldIntake, port: int, blocker: bytes, messages: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Send ``blocker``, then ``messages`` on a connection each while it is held; one batch for them."""
    results: list[object] = []
    intake.hold_next()
    first = threading.Thread(target=lambda: results.append(send(port, blocker)[0]))
    first.start()
    assert intake.holding.wait(WAIT)
    releaser = threading.Thread(target=intake.release_when_waiting, args=(len(messages),))
    releaser.start()
    replies = in_threads(*[(lambda m=m: send(port, m)[0]) for m in messages])
    releaser.join()
    first.join(WAIT)
    assert len(intake.batches) == 2 and sorted(intake.batches[1]) == sorted(messages), "not one batch"
    assert all(isinstance(r, bytes) for r in replies), replies
    return results[0], replies  # type: ignore[return-value]


def inbound(sessions: sessionmaker[Session]) -> list[InboundMessage]:
    with sessions() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


@pytest.fixture
def held(engine: Engine, mappings: MappingSet) -> HeldIntake:
    return HeldIntake(engine, mappings, group_commit=True)


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "no-group-commit"])
def test_concurrent_senders_are_all_accepted_and_stored_once(
        engine: Engine, mappings: MappingSet, sessions: sessionmaker[Session], group_commit: bool) -> None:
    def sender(first: int) -> list[str]:
        return [msa_code(r) for r in send(port, *[order(n) for n in range(first, first + 15)])]

    with listening(Intake(engine, mappings, group_commit=group_commit)) as port:
        results = in_threads(*[(lambda k=k: sender(k * 100)) for k in range(6)])
    assert results == [["AA"] * 15] * 6
    with sessions() as session:
        numbers = session.scalars(select(Order.placer_order_number)).all()
        statuses = session.execute(select(InboundMessage.status, func.count()).group_by(InboundMessage.status)).all()
    assert sorted(numbers) == sorted(f"PO-{k * 100 + i}" for k in range(6) for i in range(15))
    assert statuses == [("accepted", 90)]
    assert len(steps(sessions)) == 90


def test_a_refused_message_in_a_batch_rolls_back_only_itself(
        held: HeldIntake, sessions: sessionmaker[Session]) -> None:
    with listening(held) as port:
        assert msa_code(send(port, omg("SETUP", "P1", "PL-1"))[0]) == "AA"
        # places PL-2 for a new patient, then finds PL-1 taken: the whole message must leave no trace
        bad = omg("BAD", "P2", "PL-2", "PL-1")
        unsupported = b"MSH|^~\\&|LAB|HOSP|WL|RAD|20261123||ORU^R01|LAB1|P|2.5.1\rPID|1||X1\r"
        good = [order(n) for n in (1, 2, 3)]
        _, replies = held_batch(held, port, order(9), [good[0], bad, good[1], unsupported, good[2]])
    assert [msa_code(r) for r in replies] == ["AA", "AE", "AA", "AR", "AA"]
    assert [(loc, code) for loc, code, _ in err_fields(replies[1])] == [("ORC-2", "205")]
    with sessions() as session:
        placers = set(session.scalars(select(Order.placer_order_number)))
        patients = set(session.scalars(select(Patient.patient_id)))
    assert placers == {"PL-1", "PO-9", "PO-1", "PO-2", "PO-3"}
    assert patients == {"P1", "MRN4711"}
    rows = {row.control_id: row for row in inbound(sessions)}
    assert (rows["BAD"].status, rows["BAD"].ack_code, rows["BAD"].ack) == ("error", "AE", replies[1])
    assert (rows["LAB1"].status, rows["LAB1"].ack) == ("rejected", replies[3])
    assert all(rows[f"GC0000{n}NW"].status == "accepted" for n in (1, 2, 3))


def test_a_failing_statement_in_a_batch_rolls_back_only_its_message(
        held: HeldIntake, sessions: sessionmaker[Session]) -> None:
    """A new order whose step key exists already: refused after its order row was inserted."""
    with listening(held) as port:
        assert msa_code(send(port, order(1))[0]) == "AA"
        clash = order(1, control_id="CLASH").replace(b"PO-1", b"PO-CLASH").replace(b"FO-1", b"FO-CLASH")
        _, replies = held_batch(held, port, order(9), [order(2), clash, order(3)])
    assert [msa_code(r) for r in replies] == ["AA", "AE", "AA"]
    with sessions() as session:
        assert "PO-CLASH" not in set(session.scalars(select(Order.placer_order_number)))
    assert len(steps(sessions)) == 4


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "no-group-commit"])
def test_the_same_message_on_two_connections_is_processed_once(
        engine: Engine, mappings: MappingSet, sessions: sessionmaker[Session], group_commit: bool) -> None:
    with listening(Intake(engine, mappings, group_commit=group_commit)) as port:
        for n in range(5):
            message = order(n, control_id=f"TWICE{n}")

            def one_copy(m: bytes = message) -> bytes:
                return send(port, m)[0]

            replies = in_threads(one_copy, one_copy)
            assert replies[0] == replies[1] and msa_code(replies[0]) == "AA"  # type: ignore[arg-type]
    rows = inbound(sessions)
    assert sorted(r.status for r in rows) == ["accepted"] * 5 + ["duplicate"] * 5
    assert all(r.ack for r in rows)
    assert len(steps(sessions)) == 5
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(StepTransition)) == 5


def test_copies_arriving_together_are_answered_with_the_original_ack(
        held: HeldIntake, sessions: sessionmaker[Session]) -> None:
    """Two copies of one message on two connections while a batch runs: one is processed in the next
    batch, the other waits for its answer instead of joining that batch, and gets the same ACK."""
    message = order(1, control_id="COPY")
    with listening(held) as port:
        release = threading.Thread(target=held.release_when_waiting, args=(2,))
        held.hold_next()
        first = threading.Thread(target=send, args=(port, order(9)))
        first.start()
        assert held.holding.wait(WAIT)
        release.start()
        replies = in_threads(lambda: send(port, message)[0], lambda: send(port, order(2))[0],
                             lambda: send(port, message)[0])
        release.join()
        first.join(WAIT)
    assert replies[0] == replies[2] and msa_code(replies[0]) == "AA"  # type: ignore[arg-type]
    assert [len(batch) for batch in held.batches] == [1, 2, 1]  # the copy waited for the original's answer
    rows = [r for r in inbound(sessions) if r.control_id == "COPY"]
    assert sorted(r.status for r in rows) == ["accepted", "duplicate"]
    assert len(steps(sessions)) == 3


def test_order_per_connection_holds_while_others_are_busy(
        engine: Engine, mappings: MappingSet, sessions: sessionmaker[Session]) -> None:
    def busy(first: int) -> list[str]:
        return [msa_code(r) for r in send(port, *[order(n) for n in range(first, first + 20)])]

    def one_order() -> list[str]:
        sequence = [order(7, "NW"), order(7, "XO", start="20261123141500"), order(7, "CA")]
        return [msa_code(r) for r in send(port, *sequence)]

    with listening(Intake(engine, mappings, group_commit=True)) as port:
        results = in_threads(one_order, *[(lambda k=k: busy(100 * k)) for k in range(1, 4)])
    assert results == [["AA"] * 3] + [["AA"] * 20] * 3  # XO or CA before NW would be an unknown order
    [step] = [s for s in steps(sessions) if s.placer_order_number == "PO-7"]
    assert (step.sps_status, step.sps_start_time) == ("CANCELED", "141500")
    with sessions() as session:
        transitions = session.execute(select(StepTransition.from_status, StepTransition.to_status)
                                      .where(StepTransition.step_fk == step.id).order_by(StepTransition.id)).all()
    assert [tuple(t) for t in transitions] == [("", "SCHEDULED"), ("SCHEDULED", "CANCELED")]


def test_no_database_means_no_ack(database_url: str, tmp_path: Path, mappings: MappingSet) -> None:
    if database_url.startswith("sqlite"):
        unreachable = f"sqlite:///{tmp_path}"  # a directory: "unable to open database file"
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing"
    engine = make_engine(unreachable)
    try:
        with listening(Intake(engine, mappings, group_commit=True)) as port:
            results = in_threads(*[(lambda n=n: send(port, order(n))) for n in range(3)])
    finally:
        engine.dispose()
    assert all(isinstance(r, MLLPError) and "closed the connection" in str(r) for r in results), results


@pytest.mark.parametrize("setting", ["on", "off", "auto", True, False])
def test_the_setting_chooses_group_commit(engine: Engine, database_url: str, setting: str | bool) -> None:
    """on/off (also as YAML reads an unquoted on/off: a boolean); auto: on for SQLite only."""
    intake = build_intake(load_settings(database_url=database_url, hl7_group_commit=setting))
    try:
        expected = database_url.startswith("sqlite") if setting == "auto" else setting in ("on", True)
        assert (intake._group is not None) == expected
    finally:
        intake.engine.dispose()
        intake.archive_engine.dispose()


def test_a_bad_group_commit_setting_is_refused() -> None:
    with pytest.raises(SettingsError, match="hl7_group_commit"):
        load_settings(hl7_group_commit="sometimes")
