"""UPS event benchmark: 100 subscribers, 1,000 UPS state changes, deliveries/s and the p99
latency from a change to its N-EVENT-REPORT at the subscriber.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/ups_events.py                      # 100 subscribers x 1,000 changes, SQLite
    .venv/bin/python bench/ups_events.py --quick              # 10 subscribers x 100 changes
    .venv/bin/python bench/ups_events.py --backend postgresql --rate 20

It starts ``broker run`` (embedded queue: relay + in-process worker threads; with ``--redis`` a dedicated
redis-server and one ``broker worker``, the Celery path of production) on a fresh
database, with ``BROKER_DICOM_PEERS`` naming ``--subscribers`` event receivers that run in this process.
The receivers are cheap (they share the machine with what they measure): a lean acceptor on the
broker's PDU and command codecs that timestamps each N-EVENT-REPORT and answers Success. Then:

1. one pynetdicom SCU subscribes every receiver globally (N-ACTION 3 on the global instance);
2. ``--changes / 2`` orders arrive over HL7 (ORM^O01 as in hl7_throughput.py); a step scheduled by HL7
   sends no event, so every event counted comes from a timed change;
3. the SCU claims each workitem (N-ACTION 1, IN PROGRESS) and completes it (N-SET with the final-state
   attributes, N-ACTION 1, COMPLETED): ``--changes`` state changes, each a State Report to every
   subscriber, at ``--rate`` changes per second (0 = as fast as the SCU goes);
4. waits until every receiver has every report (or ``--drain-timeout``).

Reported: deliveries, deliveries/s (from the first change sent to the last report received),
p50/p95/p99/max latency from the change's N-ACTION being sent to each report arriving (the wall clock of
this one machine), the SCU's N-ACTION response times, the broker's CPU seconds. Target: p99 < 1 s.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hl7_throughput import (  # noqa: E402
    broker_command,
    free_port,
    latency_summary,
    migrate,
    named_cpu_seconds,
    tree_cpu_seconds,
)
from bench.mpps_pipeline import place_orders, spawn, start_redis, stop, wait_for_port  # noqa: E402
from bench.ups_changes import (  # noqa: E402
    GLOBAL_SUBSCRIPTION,
    UPS_PUSH,
    Receipts,
    Scu,
    action,
    change_workitems,
    cpu_delta,
    delivery_figures,
    options,
    run_and_report,
    wait_for_reports,
)

UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"


# --------------------------------------------------------------------------------------------------
# the receivers: the broker's own acceptor, one handler


class Receiver:
    """An event receiver on its own port: a lean acceptor for the UPS Event class, one thread per
    association, the broker's PDU and command codecs (:mod:`broker.dicom.pdu`, :mod:`broker.dicom.dimse`).

    It is the instrument, not the product: 100 of them share this machine's two cores with the broker,
    its worker and the database, and 800 reports/s through a full acceptor (pydicom decoding every
    command and data set) cost the receivers more CPU than the worker that sends them (measured: 60 CPU
    seconds per run). Here a report costs a command-set scan and a search for Procedure Step State.
    """

    def __init__(self, ae_title: str, receipts: Receipts) -> None:
        self.ae_title = ae_title
        self.receipts = receipts
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self.listener.getsockname()[1])
        self._stopping = False
        threading.Thread(target=self._accept, name=f"recv-{ae_title}", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        from broker.dicom import pdu

        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = _PduStream(sock)
        try:
            kind, body = stream.read()
            if kind != pdu.A_ASSOCIATE_RQ:
                return
            request = pdu.parse_associate_request(body)
            results = [_context_result(context) for context in request.contexts]
            sock.sendall(pdu.encode_associate_accept(request, results, [], 65536, "1.2.826.0.1.3680043.8.498.1",
                                                     "UPSBENCH"))
            command, data = bytearray(), bytearray()
            while True:
                kind, body = stream.read()
                if kind == pdu.A_RELEASE_RQ:
                    sock.sendall(pdu.encode_release_response())
                    return
                if kind != pdu.P_DATA_TF:
                    return
                for value in pdu.parse_p_data(body):
                    (command if value.is_command else data).extend(value.data)
                    if value.is_last and (not value.is_command or not _data_set_follows(command)):
                        sock.sendall(self._answer(value.context_id, bytes(command), bytes(data)))
                        command.clear()
                        data.clear()
        except (OSError, ValueError):
            return
        finally:
            sock.close()

    def _answer(self, context_id: int, command: bytes, data: bytes) -> bytes:
        """Record the report's arrival and answer Success."""
        from broker.dicom import dimse, pdu

        at = time.time()
        values = dimse.command_values(command)
        uid = _text(values, "AffectedSOPInstanceUID")
        self.receipts.add(uid, _procedure_step_state(data), at)
        response = dimse.encode_command({
            "AffectedSOPClassUID": _text(values, "AffectedSOPClassUID"),
            "CommandField": dimse.N_EVENT_REPORT_RSP,
            "MessageIDBeingRespondedTo": dimse.us_value(values, "MessageID", 0),
            "CommandDataSetType": dimse.NO_DATA_SET, "Status": 0, "AffectedSOPInstanceUID": uid,
            "EventTypeID": dimse.us_value(values, "EventTypeID", 0)})
        return pdu.encode_p_data(context_id, True, response, 65536)

    def stop(self) -> None:
        self._stopping = True
        self.listener.close()

    def peer(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"


class _PduStream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, bytearray()

    def read(self) -> tuple[int, bytes]:
        from broker.dicom import pdu

        kind, length = pdu.parse_header(self._take(pdu.PDU_HEADER_LENGTH))
        return kind, self._take(length)

    def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("closed")
            self.buffer += chunk
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data


def _context_result(context: Any) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from broker.dicom import pdu

    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if context.abstract_syntax in (UPS_EVENT, UPS_PUSH) and syntax in context.transfer_syntaxes:
            return pdu.ContextResult(context.context_id, pdu.ACCEPTANCE, syntax)
    return pdu.ContextResult(context.context_id, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, ImplicitVRLittleEndian)


def _data_set_follows(command: bytearray) -> bool:
    from broker.dicom import dimse

    return dimse.us_value(dimse.command_values(bytes(command)), "CommandDataSetType",
                          dimse.NO_DATA_SET) != dimse.NO_DATA_SET


def _text(values: dict[int, bytes], keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    return values.get(int(tag_for_keyword(keyword) or 0), b"").rstrip(b"\x00 ").decode("ascii")


# Procedure Step State (0074,1000) as its tag is written in a little endian data set
_STATE_TAG = bytes.fromhex("74000010")


def _procedure_step_state(data: bytes) -> str:
    """Procedure Step State of a State Report's Event Information, explicit or implicit VR; '' if absent.
    (A search for its tag: the reports the broker sends carry only top-level elements before it.)"""
    at = data.find(_STATE_TAG)
    if at < 0:
        return ""
    if data[at + 4:at + 6] == b"CS":
        (length,) = struct.unpack_from("<H", data, at + 6)
        start = at + 8
    else:
        (length,) = struct.unpack_from("<L", data, at + 4)
        start = at + 8
    return data[start:start + length].rstrip(b"\x00 ").decode("ascii")


def run(args: argparse.Namespace, database_url: str, workdir: Path) -> dict[str, Any]:
    from broker.domain.ups_identity import derived_ups_uid

    receipts = Receipts()
    receivers = [Receiver(f"SUB{i:03d}", receipts) for i in range(args.subscribers)]
    migrate(database_url)
    hl7_port, dicom_port = free_port(), free_port()
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("BROKER_")}
    helpers = []  # with --redis: a dedicated redis-server and one `broker worker` (Celery), as in production
    redis_url = ""
    if args.redis:
        redis, redis_url = start_redis(workdir)
        helpers.append(redis)
    env.update(BROKER_DATABASE_URL=database_url, BROKER_REDIS_URL=redis_url, BROKER_HL7_HOST="127.0.0.1",
               BROKER_HL7_PORT=str(hl7_port), BROKER_DICOM_HOST="127.0.0.1", BROKER_DICOM_PORT=str(dicom_port),
               BROKER_AE_TITLE="BROKER", BROKER_LOG_LEVEL="WARNING", BROKER_LOG_FORMAT="json",
               BROKER_DICOM_PEERS=",".join(r.peer() for r in receivers), BROKER_HTTP_PORT="0")
    broker = spawn("broker", [*broker_command(), "run"], env, workdir)
    worker = None
    if args.redis:
        worker = spawn("worker", [*broker_command(), "worker", "--concurrency", str(args.worker_concurrency)], env,
                       workdir)
        helpers.append(worker)
    try:
        wait_for_port(broker, dicom_port)
        wait_for_port(broker, hl7_port)
        scu = Scu(dicom_port)
        try:
            for receiver in receivers:
                status = action(scu.assoc, GLOBAL_SUBSCRIPTION, 3, ReceivingAE=receiver.ae_title,
                                DeletionLock="FALSE")
                if status != 0:
                    raise RuntimeError(f"subscribe {receiver.ae_title}: status {status:#06x}")
            steps, _ = place_orders(hl7_port, args.changes // 2, database_url)
            uids = [derived_ups_uid(s.study_uid, s.sps_id) for s in steps]
            cpu_before = tree_cpu_seconds(broker.pid)
            bench_cpu_before = time.process_time()  # the receivers and the SCU (this process)
            postgres_cpu_before = named_cpu_seconds("postgres")
            worker_cpu_before = tree_cpu_seconds(worker.pid) if worker is not None else None
            changes = change_workitems(scu, uids, args.rate)
            expected = wait_for_reports(receipts, changes, len(receivers), args.drain_timeout)
            cpu_after = tree_cpu_seconds(broker.pid)
            bench_cpu = time.process_time() - bench_cpu_before
            postgres_cpu = named_cpu_seconds("postgres") - postgres_cpu_before
            worker_cpu_after = tree_cpu_seconds(worker.pid) if worker is not None else None
        finally:
            scu.release()
    finally:
        how = stop(broker)
        for helper in reversed(helpers):
            stop(helper)
        for receiver in receivers:
            receiver.stop()
    return {
        **delivery_figures(receipts, changes, len(receivers), expected),
        "n_action": {k: round(v, 1) for k, v in latency_summary(changes.action_times).items()},
        "broker_cpu_s": cpu_delta(cpu_before, cpu_after),
        "receivers_and_scu_cpu_s": round(bench_cpu, 1),
        "postgres_cpu_s": round(postgres_cpu, 1) if database_url.startswith("postgresql") else None,
        "worker_cpu_s": cpu_delta(worker_cpu_before, worker_cpu_after),
        "queue": f"redis, one broker worker --concurrency {args.worker_concurrency}" if args.redis else "embedded",
        "broker_stopped_by": how,
    }


def main(argv: list[str] | None = None) -> int:
    parser = options(__doc__.split("\n\n")[0])
    parser.add_argument("--redis", action="store_true",
                        help="deliver through Celery: a dedicated redis-server and one 'broker worker' "
                             "(default: the embedded queue of 'broker run')")
    parser.add_argument("--worker-concurrency", type=int, default=4, help="with --redis: Celery pool processes")
    args = parser.parse_args(argv)
    from broker.logs import configure

    configure("console", "WARNING")  # the receivers run the broker's acceptor code in this process
    return run_and_report("ups_events", args, run, "event")


if __name__ == "__main__":
    sys.exit(main())
