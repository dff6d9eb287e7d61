"""UPS-RS event benchmark: 100 WebSocket subscribers, 1,000 UPS state changes, deliveries/s and the p99
latency from a change to its event report arriving over the subscriber's channel.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/ups_rs_events.py                      # 100 subscribers x 1,000 changes, SQLite
    .venv/bin/python bench/ups_rs_events.py --quick              # 10 subscribers x 100 changes
    .venv/bin/python bench/ups_rs_events.py --backend postgresql --rate 20

The twin of ``bench/ups_events.py`` (DIMSE subscribers), with the subscribers on UPS-RS instead: it starts
``broker run`` on a fresh database; each of ``--subscribers`` AE titles subscribes globally over UPS-RS
(``POST /dicomweb/workitems/1.2.840.10008.5.1.4.34.5/subscribers/{AE}``) and opens its WebSocket channel
(``/dicomweb/subscribers/{AE}``), all of them clients of the ``websockets`` library on one event loop of
this process that timestamp each report. Then, as in the DIMSE benchmark, ``--changes / 2`` orders arrive
over HL7 and a pynetdicom SCU claims and completes each workitem (``--changes`` state changes, each a
State Report to every subscriber) at ``--rate`` changes per second (0 = as fast as the SCU goes), and
the benchmark waits until every channel has every report (or ``--drain-timeout``).

Reported: deliveries, deliveries/s, p50/p95/p99/max latency from the change's N-ACTION being sent to the
report arriving (this machine's wall clock), the broker's CPU seconds. Target: p99 < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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
    migrate,
    named_cpu_seconds,
    tree_cpu_seconds,
)
from bench.mpps_pipeline import place_orders, spawn, stop, wait_for_port  # noqa: E402
from bench.ups_changes import (  # noqa: E402
    GLOBAL_SUBSCRIPTION,
    Receipts,
    Scu,
    change_workitems,
    cpu_delta,
    delivery_figures,
    options,
    run_and_report,
    wait_for_reports,
)

TOKEN = "bench-read-token-0123456789"
AFFECTED, STATE = "00001000", "00741000"


class Channels:
    """The subscribers' WebSocket channels on one event loop in a thread of this process."""

    def __init__(self, port: int, names: list[str], receipts: Receipts) -> None:
        self.port = port
        self.names = names
        self.receipts = receipts
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="channels", daemon=True)
        self.opened = 0
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, timeout: float = 60) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._open_all(), self.loop).result(timeout)

    async def _open_all(self) -> None:
        ready = asyncio.Event()
        self.tasks = [asyncio.create_task(self._serve(name, ready)) for name in self.names]
        while self.opened < len(self.names):
            await asyncio.wait_for(ready.wait(), 30)
            ready.clear()

    async def _serve(self, name: str, ready: asyncio.Event) -> None:
        import orjson
        from websockets.asyncio.client import connect

        url = f"ws://127.0.0.1:{self.port}/dicomweb/subscribers/{name}"
        async with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, open_timeout=30,
                           max_queue=None) as ws:
            self.opened += 1
            ready.set()
            async for message in ws:
                at = time.time()
                report = orjson.loads(message)
                state = report.get(STATE, {}).get("Value", [""])[0]
                self.receipts.add(report[AFFECTED]["Value"][0], state, at)

    def stop(self) -> None:
        async def close() -> None:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def run(args: argparse.Namespace, database_url: str, workdir: Path) -> dict[str, Any]:
    import httpx

    from broker.domain.ups_identity import derived_ups_uid

    receipts = Receipts()
    names = [f"WS{i:03d}" for i in range(args.subscribers)]
    migrate(database_url)
    hl7_port, dicom_port, http_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_DATABASE_URL=database_url, BROKER_REDIS_URL="", BROKER_HL7_HOST="127.0.0.1",
               BROKER_HL7_PORT=str(hl7_port), BROKER_DICOM_HOST="127.0.0.1", BROKER_DICOM_PORT=str(dicom_port),
               BROKER_AE_TITLE="BROKER", BROKER_LOG_LEVEL="WARNING", BROKER_LOG_FORMAT="json",
               BROKER_HTTP_HOST="127.0.0.1", BROKER_HTTP_PORT=str(http_port), BROKER_API_TOKENS=f"{TOKEN}:read")
    broker = spawn("broker", [*broker_command(), "run"], env, workdir)
    channels = Channels(http_port, names, receipts)
    try:
        wait_for_port(broker, dicom_port)
        wait_for_port(broker, hl7_port)
        wait_for_port(broker, http_port)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
            for name in names:
                answer = http.post(f"/dicomweb/workitems/{GLOBAL_SUBSCRIPTION}/subscribers/{name}",
                                   headers={"Authorization": f"Bearer {TOKEN}"})
                if answer.status_code != 201:
                    raise RuntimeError(f"subscribe {name}: {answer.status_code} {answer.text}")
        channels.start()
        scu = Scu(dicom_port)
        try:
            steps, _ = place_orders(hl7_port, args.changes // 2, database_url)
            uids = [derived_ups_uid(s.study_uid, s.sps_id) for s in steps]
            cpu_before = tree_cpu_seconds(broker.pid)
            postgres_cpu_before = named_cpu_seconds("postgres")
            changes = change_workitems(scu, uids, args.rate)
            expected = wait_for_reports(receipts, changes, len(names), args.drain_timeout)
            cpu_after = tree_cpu_seconds(broker.pid)
            postgres_cpu = named_cpu_seconds("postgres") - postgres_cpu_before
        finally:
            scu.release()
    finally:
        channels.stop()
        how = stop(broker)
    return {
        **delivery_figures(receipts, changes, len(names), expected),
        "broker_cpu_s": cpu_delta(cpu_before, cpu_after),
        "postgres_cpu_s": round(postgres_cpu, 1) if database_url.startswith("postgresql") else None,
        "broker_stopped_by": how,
    }


def main(argv: list[str] | None = None) -> int:
    return run_and_report("ups_rs_events", options(__doc__.split("\n\n")[0]).parse_args(argv), run, "report")


if __name__ == "__main__":
    sys.exit(main())
