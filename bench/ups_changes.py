"""What the two UPS event benchmarks share: the SCU that claims and completes workitems, the timed loop
of state changes, the wait for every report, the delivery figures and the command line.

``bench/ups_events.py`` (DIMSE subscribers) and ``bench/ups_rs_events.py`` (UPS-RS WebSocket
subscribers) differ only in how a report reaches this process; the changes that cause the reports, and
how their latency is counted, must be the same in both for their figures to be compared. Not a
benchmark itself (it has no ``main``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.hl7_throughput import fresh_database, latency_summary, machine_facts
from broker.domain.ups_states import ALREADY_COMPLETED, ALREADY_IN_PROGRESS

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

# N-ACTION statuses a repeated change may get when its first attempt did reach the broker
_ALREADY_DONE = (ALREADY_IN_PROGRESS, ALREADY_COMPLETED)


@dataclass
class Receipts:
    """(workitem UID, state) -> arrival times, over all receivers."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    times: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    count: int = 0

    def add(self, uid: str, state: str, at: float) -> None:
        with self.lock:
            self.times.setdefault((uid, state), []).append(at)
            self.count += 1

    def delivered(self, sent: dict[tuple[str, str], float]) -> int:
        """Reports received for the changes in ``sent`` (a stray report for anything else does not count,
        so the wait for the last report cannot end early)."""
        with self.lock:
            return sum(len(ats) for key, ats in self.times.items() if key in sent)


# --------------------------------------------------------------------------------------------------
# the SCU


def associate(port: int) -> Any:
    """A pynetdicom association with the broker for UPS Push, Pull and Watch."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        UnifiedProcedureStepPull,
        UnifiedProcedureStepPush,
        UnifiedProcedureStepWatch,
    )

    ae = AE(ae_title="BENCHSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in (UnifiedProcedureStepPush, UnifiedProcedureStepPull, UnifiedProcedureStepWatch):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="BROKER")
    if not assoc.is_established:
        raise RuntimeError("no association with the broker")
    return assoc


def action(assoc: Any, uid: str, action_type: int, **attributes: str) -> int:
    """N-ACTION ``action_type`` on workitem ``uid`` with the given attributes; its Status."""
    from pydicom import Dataset

    info = Dataset()
    for keyword, value in attributes.items():
        setattr(info, keyword, value)
    status, _ = assoc.send_n_action(info, action_type, UPS_PUSH, uid)
    if not status:
        raise RuntimeError("no N-ACTION response")
    return int(status.Status)


def final_attributes(transaction_uid: str) -> Any:
    """The N-SET data set a workitem needs before it may be COMPLETED (the Final State requirements)."""
    from pydicom import Dataset

    ds = Dataset()
    ds.TransactionUID = transaction_uid
    performed = Dataset()
    performed.PerformedProcedureStepStartDateTime = "20261201100000"
    performed.PerformedProcedureStepEndDateTime = "20261201101000"
    ds.UnifiedProcedureStepPerformedProcedureSequence = [performed]
    return ds


def paced(count: int, rate: float) -> Iterator[int]:
    """0..count-1, at ``rate`` per second (0 = no pacing)."""
    started = time.monotonic()
    for i in range(count):
        if rate > 0:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield i


class Scu:
    """The benchmark's SCU: one association at a time, replaced when a response goes missing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.assoc = associate(port)

    def reassociate(self) -> None:
        with contextlib.suppress(Exception):
            self.assoc.abort()
        self.assoc = associate(self.port)

    def release(self) -> None:
        self.assoc.release()


# --------------------------------------------------------------------------------------------------
# the timed changes and their reports


@dataclass
class Changes:
    """The outcome of :func:`change_workitems`."""

    sent: dict[tuple[str, str], float]  # (workitem UID, state) -> when its N-ACTION was sent
    action_times: list[float]  # each N-ACTION's response time, seconds
    failures: int
    reassociations: int
    started: float
    finished: float


def change_workitems(scu: Scu, uids: list[str], rate: float) -> Changes:
    """Claim (IN PROGRESS) and complete (N-SET final attributes, COMPLETED) each workitem: two state
    changes apiece, at ``rate`` per second (0 = as fast as the SCU goes)."""
    from pydicom.uid import generate_uid

    sent: dict[tuple[str, str], float] = {}
    action_times: list[float] = []
    failures = retried = 0
    started = time.time()
    for i in paced(len(uids) * 2, rate):
        uid = uids[i // 2]
        txn = str(generate_uid(entropy_srcs=[uid, "bench"]))
        state = "IN PROGRESS" if i % 2 == 0 else "COMPLETED"
        for attempt in range(2):
            # pynetdicom as SCU sometimes misses a fast response (it queues it as an unexpected
            # request, then waits): associate again and repeat, accepting "already done".
            try:
                if state == "COMPLETED":
                    status, _ = scu.assoc.send_n_set(final_attributes(txn), UPS_PUSH, uid)
                    if not status or status.Status != 0:
                        raise RuntimeError("no N-SET response")
                sent.setdefault((uid, state), time.time())
                t0 = time.perf_counter()
                status_code = action(scu.assoc, uid, 1, ProcedureStepState=state, TransactionUID=txn)
                action_times.append(time.perf_counter() - t0)
                ok = status_code == 0 or (attempt and status_code in _ALREADY_DONE)
                failures += int(not ok)
                break
            except RuntimeError:
                retried += 1
                scu.reassociate()
        else:
            failures += 1
    return Changes(sent, action_times, failures, retried, started, time.time())


def wait_for_reports(receipts: Receipts, changes: Changes, subscribers: int, timeout: float) -> int:
    """Wait until every subscriber has a report of every change (or ``timeout`` seconds); the number
    of reports expected."""
    expected = len(changes.sent) * subscribers
    deadline = time.monotonic() + timeout
    while receipts.delivered(changes.sent) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return expected


def delivery_figures(receipts: Receipts, changes: Changes, subscribers: int, expected: int) -> dict[str, Any]:
    """The figures both benchmarks report, in the order of their JSON: the latency of a report is from its
    change's N-ACTION being sent to its arrival, the rate from the first change to the last report."""
    sent, started = changes.sent, changes.started
    latencies = [at - sent[key] for key, ats in receipts.times.items() if key in sent for at in ats]
    last = max((at for key, ats in receipts.times.items() if key in sent for at in ats), default=started)
    return {
        "subscribers": subscribers, "changes": len(sent), "change_failures": changes.failures,
        "scu_reassociations": changes.reassociations,
        "deliveries_expected": expected, "deliveries": len(latencies),
        "changes_seconds": round(changes.finished - started, 2),
        "changes_per_s": round(len(sent) / (changes.finished - started), 1),
        "delivery_seconds": round(last - started, 2),
        "deliveries_per_s": round(len(latencies) / (last - started), 1) if last > started else None,
        "latency": {k: round(v, 1) for k, v in latency_summary(latencies).items()},
    }


def cpu_delta(before: float | None, after: float | None) -> float | None:
    """CPU seconds between two readings of a process tree (None where it could not be read)."""
    return round(after - before, 1) if before is not None and after is not None else None


# --------------------------------------------------------------------------------------------------
# the command line


def options(description: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0, help="state changes per second (0 = unpaced)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--drain-timeout", type=float, default=600)
    parser.add_argument("--quick", action="store_true", help="10 subscribers x 100 changes")
    parser.add_argument("--keep", type=Path, help="keep the database and the broker's log in this directory")
    return parser


def run_and_report(bench: str, args: argparse.Namespace,
                   run: Callable[[argparse.Namespace, str, Path], dict[str, Any]], report_word: str) -> int:
    """Run ``run`` on a fresh database, print its JSON report and a one-line verdict; the exit status
    (0 when every report arrived and every change succeeded)."""
    if args.quick:
        args.subscribers, args.changes = 10, 100
    with tempfile.TemporaryDirectory(prefix=f"{bench.replace('_', '-')}-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with fresh_database(args.backend, args.pg_url, workdir) as database_url:
            result = run(args, database_url, workdir)
    report = {"bench": bench, "at": datetime.now(UTC).isoformat(timespec="seconds"),
              "backend": args.backend, "rate": args.rate, **result, "machine": machine_facts()}
    print(json.dumps(report, indent=2))
    latency = report["latency"]["p99_ms"]
    print(f"\n{report['deliveries']}/{report['deliveries_expected']} deliveries, "
          f"{report['deliveries_per_s']}/s; change -> {report_word} p99 {latency:.0f} ms "
          f"({'meets' if latency < 1000 else 'misses'} the 1 s target)")
    return 0 if report["deliveries"] == report["deliveries_expected"] and not report["change_failures"] else 1
