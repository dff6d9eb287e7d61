"""Cluster scaling benchmark: one broker node against two behind HAProxy, on this machine, in one run.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/cluster_scaling.py                      # 1 and 2 nodes, 10 s per phase
    .venv/bin/python bench/cluster_scaling.py --seconds 5 --mpps-pairs 200   # shorter rounds

For each node count N (``--nodes``, default ``1,2``) it starts, on a fresh PostgreSQL database and a
Redis of their own, N ``broker run`` nodes, N Celery workers (``broker worker --concurrency 1``) and
HAProxy in front of the nodes (``tests/cluster_support.py``, the cluster tests' harness; HAProxy's
configuration is rendered from ``config/haproxy/cluster.cfg.template``), plus a test RIS that ACKs the
status messages. Every client goes through HAProxy, as in a department. Three phases, one after the other:

1. **HL7**: ``--hl7-senders`` persistent MLLP connections send new orders (ORM^O01 NW, unique ids, as in
   ``hl7_throughput.py``) back to back for ``--seconds``; HAProxy spreads the connections over the nodes.
2. **C-FIND**: ``--cfind-clients`` modalities query the worklist for ``--seconds``, each query on a new
   association (``bench/mwl_clients.py``'s raw client: almost no client CPU), one patient's items.
3. **MPPS**: ``--mpps-clients`` modalities perform ``--mpps-pairs`` of the orders placed in phase 1: N-CREATE
   IN PROGRESS, then N-SET COMPLETED (``mpps_pipeline.py``'s raw client), each client on one association;
   then the run waits until every HL7 status to the RIS (IP and CM per order) has been delivered.

First the idle cluster's CPU for ``--idle-seconds`` (health checks, relay polls, lease renewals: what N
nodes cost when nothing happens). Reported per phase: operations/s (HL7 messages ACKed, C-FIND queries
answered, MPPS N-CREATE + N-SET answered), and CPU milliseconds per operation of each kind of process,
from /proc: the broker nodes, the workers, HAProxy, Redis, PostgreSQL (the backends serving the cluster's
database, found in ``pg_stat_activity``) and this client process. The MPPS figures count the CPU
until the statuses were delivered, so the relay and the workers' sending are in them. The machine has 2
cores: two nodes cannot be faster here; the point is the CPU per operation of each process and where the
bottleneck is.
Results (JSON) go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hl7_throughput import (  # noqa: E402
    SAMPLE,
    MessageFactory,
    fresh_database,
    machine_facts,
    tree_cpu_seconds,
)
from bench.mpps_pipeline import Step, TestRis, drain, run_raw_client  # noqa: E402
from bench.mwl_clients import RawQuery, raw_query  # noqa: E402
from tests.cluster_support import Cluster, running_cluster  # noqa: E402

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
# Production-like settings for the nodes (the harness's defaults are the tests' short ones).
BENCH_SETTINGS = {"log_level": "WARNING", "hl7_workers": "8", "event_poll_interval": "0.5",
                  "event_lease_seconds": "60", "ris_hl7_ack_timeout": "10"}


def backend_cpu(cluster: Cluster) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend serving the cluster's database (by pid). Only these:
    the server may serve other databases at the same time, and its other processes are not the cluster's."""
    from sqlalchemy import text

    with cluster.engine.connect() as db:
        pids = db.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                               "AND pid <> pg_backend_pid()")).scalars().all()
    return {int(pid): tree_cpu_seconds(int(pid)) or 0.0 for pid in pids}


def cpu_snapshot(cluster: Cluster) -> dict[str, Any]:
    """CPU seconds so far of each kind of process of the cluster, of its database's PostgreSQL backends
    (by pid), and of this process."""
    def total(pids: list[int]) -> float:
        return sum(tree_cpu_seconds(pid) or 0.0 for pid in pids)

    assert cluster.haproxy is not None and cluster.haproxy.process is not None
    assert cluster.redis.process is not None
    return {
        "nodes": total([n.process.pid for n in cluster.nodes if n.process is not None]),
        "workers": total([w.process.pid for w in cluster.workers if w.process is not None]),
        "haproxy": total([cluster.haproxy.process.pid]),
        "redis": total([cluster.redis.process.pid]),
        "postgres": backend_cpu(cluster),
        "client": time.process_time(),
    }


def spent_seconds(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU seconds between two snapshots; a backend that started in between counts from zero (one that
    ended in between is lost: the nodes' pools keep theirs open)."""
    spent = {name: after[name] - before[name] for name in before if name != "postgres"}
    spent["postgres"] = sum(cpu - before["postgres"].get(pid, 0.0) for pid, cpu in after["postgres"].items())
    return spent


def per_operation(before: dict[str, Any], after: dict[str, Any], operations: int) -> dict[str, float]:
    """CPU milliseconds per operation of each kind of process, and their total."""
    spent = {name: seconds * 1000 / max(operations, 1) for name, seconds in spent_seconds(before, after).items()}
    spent["total"] = sum(spent.values())
    return spent


def hl7_phase(port: int, factory: MessageFactory, senders: int, seconds: float) -> tuple[int, int, float]:
    """Persistent senders back to back for ``seconds``; (ACKed AA, failures, wall seconds)."""
    from broker.hl7.mllp_client import MLLPClient, MLLPError

    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    batches = [factory.build(int(seconds * 400 / senders) + 200) for _ in range(senders)]
    deadline = time.monotonic() + seconds

    def sender(messages: list[bytes]) -> None:
        with MLLPClient("127.0.0.1", port, timeout=30) as client:
            for message in messages:
                if time.monotonic() >= deadline:
                    return
                try:
                    ok = b"MSA|AA" in client.send(message)
                except MLLPError:
                    ok = False
                with lock:
                    counts["ok" if ok else "failed"] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=sender, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts["ok"], counts["failed"], time.monotonic() - started


def cfind_phase(port: int, clients: int, seconds: float) -> tuple[int, int, float, int]:
    """Modalities querying one patient's items for ``seconds``; (answered, failed, wall seconds, matches of one)."""
    from pydicom import Dataset

    identifier = Dataset()
    identifier.PatientName = ""
    identifier.PatientID = "MRN00001"
    identifier.AccessionNumber = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = ""
    sps.ScheduledProcedureStepStartDate = ""
    sps.Modality = ""
    identifier.ScheduledProcedureStepSequence = [sps]
    query = RawQuery(identifier, "CT01", "BROKER")
    counts = {"ok": 0, "failed": 0, "matches": 0}

    async def client(deadline: float) -> None:
        while time.monotonic() < deadline:
            outcome = await raw_query(port, query, nodelay=True)
            if outcome.error:
                counts["failed"] += 1
                await asyncio.sleep(0.05)
            else:
                counts["ok"] += 1
                counts["matches"] = outcome.matches

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client(deadline) for _ in range(clients)))

    started = time.monotonic()
    asyncio.run(main())
    return counts["ok"], counts["failed"], time.monotonic() - started, counts["matches"]


def placed_steps(cluster: Cluster, count: int) -> list[Step]:
    from sqlalchemy import select

    from broker.store.tables import ScheduledStep, table_of

    steps = table_of(ScheduledStep)
    with cluster.engine.connect() as db:
        found = list(db.execute(select(steps).order_by(steps.c.id).limit(count)))
    return [Step(i, r.study_instance_uid, r.sps_id, r.accession_number, r.procedure_fk, r.patient_id)
            for i, r in enumerate(found)]


def mpps_phase(port: int, steps: list[Step], clients: int) -> tuple[int, int, float]:
    """Each client performs its share of ``steps`` on one association; (answered 0000, failed, wall seconds)."""
    import pydicom.dataset  # noqa: F401  (imported once before the threads: see mpps_pipeline._client_group)
    import pynetdicom.dsutils  # noqa: F401

    groups = [steps[i::clients] for i in range(clients)]
    results: list[Any] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(group: list[Step]) -> None:
        done, failed = run_raw_client(port, group, time.time(), 30)
        with lock:
            results.extend(done)
            errors.extend(failed)

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(group,)) for group in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = sum((create == 0) + (final == 0) for _, _, _, create, _, _, final in results)
    return ok, 2 * len(steps) - ok, time.monotonic() - started


def measured(cluster: Cluster, run: Callable[[], tuple[int, int, float]],
             settle: Callable[[], object] | None = None) -> dict[str, Any]:
    """Run a phase between two CPU snapshots (the second after ``settle``, e.g. the outbox drained)."""
    before = cpu_snapshot(cluster)
    ok, failed, wall = run()
    if settle is not None:
        settle()
    after = cpu_snapshot(cluster)
    return {"operations": ok, "failed": failed, "wall_s": wall, "ops_per_s": ok / wall if wall else math.nan,
            "cpu_ms_per_op": per_operation(before, after, ok)}


def run_cluster(nodes: int, args: argparse.Namespace, factory: MessageFactory, workdir: Path) -> dict[str, Any]:
    ris = TestRis()
    ris.start()
    result: dict[str, Any] = {"nodes": nodes, "workers": nodes}
    try:
        with fresh_database("postgresql", args.pg_url, workdir) as url, \
                running_cluster(url, workdir, nodes=nodes, workers=nodes, overrides=BENCH_SETTINGS,
                                ris_hl7_address=f"127.0.0.1:{ris.port}") as cluster:
            assert cluster.haproxy is not None
            proxy = cluster.haproxy
            print(f"{nodes} node(s): idle ...", flush=True)
            before = cpu_snapshot(cluster)
            time.sleep(args.idle_seconds)
            after = cpu_snapshot(cluster)
            result["idle_cpu_percent"] = {name: 100 * seconds / args.idle_seconds
                                          for name, seconds in spent_seconds(before, after).items()}
            print(f"{nodes} node(s): HL7 ...", flush=True)
            result["hl7"] = measured(cluster, lambda: hl7_phase(proxy.hl7_port, factory, args.hl7_senders,
                                                                 args.seconds))
            print(f"{nodes} node(s): C-FIND ...", flush=True)
            matches = {"n": 0}

            def cfind() -> tuple[int, int, float]:
                ok, failed, wall, matches["n"] = cfind_phase(proxy.dicom_port, args.cfind_clients, args.seconds)
                return ok, failed, wall

            result["cfind"] = measured(cluster, cfind)
            result["cfind"]["matches_per_query"] = matches["n"]
            print(f"{nodes} node(s): MPPS ...", flush=True)
            steps = placed_steps(cluster, args.mpps_pairs)
            drained: dict[str, Any] = {}

            def settle() -> None:
                ok, seconds, counts = drain(cluster.database_url, 120)
                drained.update(drained=ok, drain_s=seconds, outbox=counts)

            result["mpps"] = measured(cluster, lambda: mpps_phase(proxy.dicom_port, steps, args.mpps_clients), settle)
            result["mpps"].update(drained)
            result["postgres_backends"] = len(backend_cpu(cluster))  # the cluster's open connections
            result["ris_messages"] = ris.messages
    finally:
        ris.stop()
    return result


def print_report(report: dict[str, Any]) -> None:
    facts = report["machine"]
    print(f"\nmachine: nproc {facts['nproc']}, {facts['cpu_model'] or 'cpu ?'}; {report['seconds']} s per phase")
    names = ["nodes", "workers", "haproxy", "redis", "postgres", "client", "total"]
    print(f"{'phase':8} {'nodes':>5} {'ops/s':>8} {'failed':>6}  CPU ms/op: " + " ".join(f"{n:>8}" for n in names))
    for phase in ("hl7", "cfind", "mpps"):
        for run in report["runs"]:
            r = run[phase]
            cpu = r["cpu_ms_per_op"]
            print(f"{phase:8} {run['nodes']:>5} {r['ops_per_s']:>8.1f} {r['failed']:>6}             "
                  + " ".join(f"{cpu[n]:>8.2f}" for n in names))
    print("PostgreSQL connections of the cluster after the load: "
          + ", ".join(f"{run['nodes']} node(s) {run['postgres_backends']}" for run in report["runs"]))
    print("idle cluster, CPU % of one core: "
          + "; ".join(f"{run['nodes']} node(s): " + ", ".join(f"{name} {value:.1f}" for name, value in
                                                              run["idle_cpu_percent"].items() if name != "client")
                      for run in report["runs"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2", help="node counts to compare (default 1,2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the HL7 and C-FIND phases")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="the idle cluster's CPU is measured first")
    parser.add_argument("--hl7-senders", type=int, default=4)
    parser.add_argument("--cfind-clients", type=int, default=4)
    parser.add_argument("--mpps-clients", type=int, default=4)
    parser.add_argument("--mpps-pairs", type=int, default=300, help="orders performed in the MPPS phase")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="a PostgreSQL server where CREATE DATABASE works")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    factory = MessageFactory(SAMPLE.read_bytes())
    report: dict[str, Any] = {"machine": machine_facts(), "seconds": args.seconds, "args": {
        k: str(v) for k, v in vars(args).items()}, "runs": []}
    for nodes in [int(n) for n in args.nodes.split(",")]:
        with tempfile.TemporaryDirectory(prefix=f"cluster-{nodes}-") as tmp:
            report["runs"].append(run_cluster(nodes, args, factory, Path(tmp)))
    print_report(report)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = args.json or ROOT / "bench" / "results" / f"cluster-{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))
    print(f"results: {target}")
    failed = any(run[phase]["failed"] for run in report["runs"] for phase in ("hl7", "cfind", "mpps"))
    with contextlib.suppress(KeyError):
        failed = failed or not all(run["mpps"]["drained"] for run in report["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
