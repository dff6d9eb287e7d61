"""DICOMweb search benchmark: UPS-RS Search and the MWL search over HTTP against DIMSE C-FIND, one run.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/dicomweb_search.py                        # 100k items, SQLite
    .venv/bin/python bench/dicomweb_search.py --backend postgresql --size 100000 --queries 200
    .venv/bin/python bench/dicomweb_search.py --quick                # 10k items, a few queries: does it work?

What it does: a fresh database (``broker db upgrade``) is bulk-loaded with the items of
``bench/mwl_items.py`` (the same generator as the MWL benchmark; each step also gets its UPS SOP Instance
UID, as the domain service gives it), then ``broker run`` serves it on free ports (DICOM, HTTP, HL7;
``BROKER_LOG_LEVEL=WARNING``, a read token). For each query it runs, one at a time:

* **HTTP**: ``GET /dicomweb/mwlitems?...`` or ``/dicomweb/workitems?...`` with httpx on one kept-alive
  connection (the whole body read and parsed as JSON);
* **DIMSE**: the C-FIND with the same identifier (worklist, or UPS Pull) with pynetdicom on one
  association kept open for the series (every pending response received and decoded: pynetdicom's
  CPU is the client's, and on a small machine it competes with the broker);
* **DIMSE raw** (worklist only): ``bench/mwl_clients.py``'s raw client, association + C-FIND + release,
  responses counted, not decoded: the broker's side of a C-FIND without a slow client.

Queries: MWL *typical* (station + today + modality, ~20 matches) and *broad* (a week of one modality,
~200 matches), as ``bench/mwl_query.py``; UPS *patient* (one Patient ID) and UPS *station-today*
(Worklist Label + today's start range), both narrowed in SQL by ``broker.ups.prefilter`` (station-today
on ``ix_steps_station_start``; before it, every workitem was matched in Python: 17-64 s a query at 100k,
so it once had fewer repetitions). The HTTP searches ask for all matches
(``limit`` = the server maximum), so both paths return the same items.

Reported per query and path: p50 / p90 / max latency (ms), matches, the broker's CPU per query (user +
system of its process tree over the series, minus its idle CPU rate measured before), the client's CPU
per query, and the ratio HTTP p50 / DIMSE p50 (goal: at most 2; also against the raw client). Results:
a table on stdout and a JSON file (default ``bench/results/dicomweb-search-<timestamp>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hl7_throughput import (  # noqa: E402
    _sigterm,
    broker_command,
    free_port,
    fresh_database,
    machine_facts,
    percentile,
    tree_cpu_seconds,
)
from bench.mwl_clients import RawQuery, raw_query  # noqa: E402
from bench.mwl_items import SEED, Spread, analyze, load_database, queries  # noqa: E402
from bench.mwl_peers import Server, _spawn, migrate, server_env, stop_server, wait_ready  # noqa: E402

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TOKEN = "bench-read-token-0123456789"
TARGET_RATIO = 2.0
HTTP_MAX_RESULTS = 1000  # broker.web.dicomweb.search.MAX_RESULTS
SPS = "ScheduledProcedureStepSequence"


@dataclass(frozen=True)
class Query:
    """One query as both paths ask it: HTTP parameters and the C-FIND identifier of the same keys."""

    name: str
    resource: str  # "mwlitems" or "workitems"
    params: list[tuple[str, str]]
    identifier: Any  # pydicom Dataset


def build_queries(today: date, patient_id: str) -> list[Query]:
    """The MWL queries of bench/mwl_query.py and two UPS queries, each with its C-FIND identifier."""
    from broker.web.dicomweb.qido import UPS, parse_search

    out: list[Query] = []
    for spec in queries(today):
        params = [(f"{SPS}.Modality", spec.modality), (f"{SPS}.ScheduledProcedureStepStartDate", spec.start_date)]
        if spec.station_ae:
            params.append((f"{SPS}.ScheduledStationAETitle", spec.station_ae))
        out.append(Query(f"mwl-{spec.name}", "mwlitems", params, spec.identifier()))
    day = today.strftime("%Y%m%d")
    for name, params in (
            ("ups-patient", [("PatientID", patient_id)]),
            ("ups-station-today", [("WorklistLabel", "CT01"),
                                   ("ScheduledProcedureStepStartDateTime", f"{day}000000-{day}235959")])):
        out.append(Query(name, "workitems", params, parse_search(params, UPS).identifier))
    return out


# --------------------------------------------------------------------------------------------------
# the database


def add_ups_uids(url: str) -> float:
    """Each loaded step's UPS SOP Instance UID (the bulk load writes the worklist columns only)."""
    from sqlalchemy import bindparam, create_engine, select, update

    from broker.domain.ups_identity import derived_ups_uid
    from broker.store.tables import ScheduledStep, table_of

    steps = table_of(ScheduledStep)
    engine = create_engine(url)
    started = time.perf_counter()
    try:
        with engine.begin() as db:
            rows = db.execute(select(steps.c.id, steps.c.study_instance_uid, steps.c.sps_id)).all()
            statement = update(steps).where(steps.c.id == bindparam("step_id")) \
                .values(ups_instance_uid=bindparam("uid"))
            for start in range(0, len(rows), 5000):
                db.execute(statement, [{"step_id": r.id, "uid": derived_ups_uid(r.study_instance_uid, r.sps_id)}
                                       for r in rows[start:start + 5000]])
    finally:
        engine.dispose()
    return time.perf_counter() - started


def some_patient(url: str) -> str:
    """The Patient ID with the most steps (the UPS patient query has several matches)."""
    from sqlalchemy import create_engine, func, select

    from broker.store.tables import ScheduledStep, table_of

    steps = table_of(ScheduledStep)
    engine = create_engine(url)
    try:
        with engine.connect() as db:
            return str(db.execute(select(steps.c.patient_id).group_by(steps.c.patient_id)
                                  .order_by(func.count().desc(), steps.c.patient_id).limit(1)).scalar_one())
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------------
# the broker


def start_broker(database_url: str, workdir: Path) -> tuple[Server, int]:
    """``broker run`` on free ports with a read token; returns the server and its HTTP port."""
    dicom_port, http_port = free_port(), free_port()
    env = server_env({
        "BROKER_DATABASE_URL": database_url, "BROKER_LOG_LEVEL": "WARNING", "BROKER_AE_TITLE": "BROKER",
        "BROKER_DICOM_HOST": "127.0.0.1", "BROKER_DICOM_PORT": str(dicom_port),
        "BROKER_HL7_HOST": "127.0.0.1", "BROKER_HL7_PORT": str(free_port()),
        "BROKER_HTTP_HOST": "127.0.0.1", "BROKER_HTTP_PORT": str(http_port),
        "BROKER_API_TOKENS": f"{TOKEN}:read", "BROKER_REDIS_URL": "",
    })
    server = _spawn("broker", [*broker_command(), "run"], dicom_port, "BROKER", workdir, env, ROOT, {})
    return server, http_port


def wait_http(port: int, server: Server, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"broker exited:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the HTTP port {port} did not answer within {timeout:.0f} s:\n{server.log_tail()}")


# --------------------------------------------------------------------------------------------------
# the two clients


class HttpClient:
    """httpx on one kept-alive connection; a search returns the number of results."""

    def __init__(self, port: int) -> None:
        import httpx

        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}/dicomweb",
                                   headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"},
                                   timeout=120)

    def search(self, query: Query) -> int:
        answer = self.client.get(f"/{query.resource}", params=[*query.params, ("limit", str(HTTP_MAX_RESULTS))])
        if answer.status_code == 204:
            return 0
        answer.raise_for_status()
        if "Warning" in answer.headers and "exceeded" in answer.headers["Warning"]:
            raise RuntimeError(f"{query.name}: more than {HTTP_MAX_RESULTS} matches; the paths would differ")
        return len(answer.json())

    def close(self) -> None:
        self.client.close()


class DimseClient:
    """pynetdicom on one association (worklist and UPS Pull) kept open; a C-FIND returns the matches."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            ModalityWorklistInformationFind,
            UnifiedProcedureStepPull,
        )

        from broker.outbound.requestor_responses import keep_responses_for_the_caller

        # pynetdicom's reactor can take a response send_c_find waits for (see the module named): keep them
        keep_responses_for_the_caller()
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        self.models = {"mwlitems": ModalityWorklistInformationFind, "workitems": UnifiedProcedureStepPull}
        ae = AE(ae_title="CT01")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        ae.maximum_pdu_size = 0
        for model in self.models.values():
            ae.add_requested_context(model)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="BROKER")
        if not self.assoc.is_established:
            raise RuntimeError("the broker refused the association")

    def search(self, query: Query) -> int:
        count = 0
        for status, _ in self.assoc.send_c_find(query.identifier, self.models[query.resource]):
            if not status:
                raise RuntimeError(f"{query.name}: no C-FIND response")
            if status.Status in (0xFF00, 0xFF01):
                count += 1
            elif status.Status != 0x0000:
                raise RuntimeError(f"{query.name}: C-FIND status {status.Status:04X}")
        return count

    def close(self) -> None:
        self.assoc.release()


class RawDimseClient:
    """bench/mwl_clients.py's raw worklist client: association + C-FIND + release per query, the bytes
    pre-encoded and the responses only counted (< 1 ms of client CPU), so its latency is the broker's."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.encoded: dict[str, RawQuery] = {}

    def search(self, query: Query) -> int:
        raw = self.encoded.get(query.name)
        if raw is None:
            raw = self.encoded[query.name] = RawQuery(query.identifier, "CT01", "BROKER")
        outcome = asyncio.run(raw_query(self.port, raw, nodelay=True))
        if outcome.error:
            raise RuntimeError(f"{query.name}: {outcome.error}")
        return int(outcome.matches)

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------------------------------
# series


def idle_cpu_rate(pid: int, seconds: float = 3.0) -> float:
    """The broker's CPU seconds per second while nothing asks it anything (relay, heartbeat, ...)."""
    before = tree_cpu_seconds(pid) or 0.0
    time.sleep(seconds)
    return ((tree_cpu_seconds(pid) or 0.0) - before) / seconds


def run_series(search: Callable[[Query], int], query: Query, count: int, warmup: int, pid: int,
               idle_rate: float) -> dict[str, Any]:
    for _ in range(warmup):
        search(query)
    latencies: list[float] = []
    matches: set[int] = set()
    cpu_before = tree_cpu_seconds(pid) or 0.0
    client_before = time.process_time()
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        matches.add(search(query))
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    broker_cpu = (tree_cpu_seconds(pid) or 0.0) - cpu_before - idle_rate * wall
    latencies.sort()
    return {"queries": count, "matches": sorted(matches), "p50_ms": percentile(latencies, 50) * 1000,
            "p90_ms": percentile(latencies, 90) * 1000, "max_ms": latencies[-1] * 1000,
            "broker_cpu_ms_per_query": max(broker_cpu, 0.0) / count * 1000,
            "client_cpu_ms_per_query": client_cpu / count * 1000, "wall_s": wall}


# --------------------------------------------------------------------------------------------------
# main


def _p(*parts: Any) -> None:
    print(*parts, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=100_000, help="items in the database (default 100000)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--queries", type=int, default=100, help="measured queries per query and path (default 100)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured queries first (default 3)")
    parser.add_argument("--quick", action="store_true", help="10k items, 10 queries")
    parser.add_argument("--today", type=lambda t: datetime.strptime(t, "%Y%m%d").date(), default=date.today())
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.queries, args.warmup = 10_000, 10, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    started = datetime.now(UTC)
    json_path: Path = args.json or ROOT / "bench" / "results" / \
        f"dicomweb-search-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report: dict[str, Any] = {"benchmark": "dicomweb_search", "started": started.isoformat(timespec="seconds"),
                              "settings": {k: str(v) for k, v in vars(args).items()}, "machine": machine_facts(),
                              "series": []}
    with tempfile.TemporaryDirectory(prefix="dicomweb-bench-") as tmp:
        workdir = Path(tmp)
        with fresh_database(args.backend, args.pg_url, workdir) as url:
            _p(f"{args.backend}: {args.size} items ...")
            report["migrate"] = migrate(url)
            load = load_database(url, Spread(args.size, args.today, SEED))
            report["load"] = {"seconds": load.get("seconds"), "ups_uids_s": add_ups_uids(url),
                              "analyze_s": analyze(url, vacuum=True)}
            queries_ = build_queries(args.today, some_patient(url))
            report["queries"] = [{"name": q.name, "resource": q.resource, "params": q.params} for q in queries_]
            server, http_port = start_broker(url, workdir)
            try:
                report["ready_s"] = wait_ready(server)
                wait_http(http_port, server)
                idle = idle_cpu_rate(server.pid)
                report["broker_idle_cpu_per_s"] = idle
                http, dimse, raw = HttpClient(http_port), DimseClient(server.port), RawDimseClient(server.port)
                try:
                    for query in queries_:
                        count = args.queries
                        paths: list[tuple[str, Callable[[Query], int]]] = [("dimse", dimse.search),
                                                                            ("http", http.search)]
                        if query.resource == "mwlitems":
                            paths.insert(1, ("dimse-raw", raw.search))
                        for path, search in paths:
                            _p(f"  {query.name} {path} x{count} ...")
                            result = run_series(search, query, count, args.warmup, server.pid, idle)
                            report["series"].append({"query": query.name, "path": path, **result})
                finally:
                    http.close()
                    dimse.close()
            finally:
                report["stop"] = stop_server(server)
    report["comparison"] = compare(report["series"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print_report(report, json_path)
    return 0 if all(c["ok"] for c in report["comparison"]) else 1


def compare(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HTTP against DIMSE per query: the p50 ratios (to the pynetdicom C-FIND on a kept association, and to
    the raw client where there is one) and whether all returned the same number of matches."""
    out = []
    for name in dict.fromkeys(s["query"] for s in series):
        pair = {s["path"]: s for s in series if s["query"] == name}
        if not {"http", "dimse"} <= set(pair):
            continue
        ratio = pair["http"]["p50_ms"] / pair["dimse"]["p50_ms"]
        raw = pair["http"]["p50_ms"] / pair["dimse-raw"]["p50_ms"] if "dimse-raw" in pair else None
        same = len({tuple(s["matches"]) for s in pair.values()}) == 1
        out.append({"query": name, "ratio_p50": ratio, "ratio_p50_raw": raw, "same_matches": same,
                    "ok": same and ratio <= TARGET_RATIO})
    return out


def print_report(report: dict[str, Any], json_path: Path) -> None:
    _p(f"\n{report['settings']['backend']}, {report['settings']['size']} items; broker idle CPU "
       f"{report['broker_idle_cpu_per_s'] * 1000:.1f} ms/s (subtracted)")
    header = (f"{'query':<20}{'path':<10}{'n':>5}{'matches':>9}{'p50 ms':>9}{'p90 ms':>9}{'max ms':>9}"
              f"{'broker CPU/q ms':>17}{'client CPU/q ms':>17}")
    _p(header)
    _p("-" * len(header))
    for s in report["series"]:
        _p(f"{s['query']:<20}{s['path']:<10}{s['queries']:>5}{','.join(map(str, s['matches'])):>9}"
           f"{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}{s['max_ms']:>9.2f}{s['broker_cpu_ms_per_query']:>17.2f}"
           f"{s['client_cpu_ms_per_query']:>17.2f}")
    _p("\nHTTP p50 / DIMSE p50 (goal <= 2; vs the pynetdicom C-FIND on a kept association, and vs the raw "
       "client's association + C-FIND where measured):")
    for c in report["comparison"]:
        raw = f"   vs raw {c['ratio_p50_raw']:.2f}" if c["ratio_p50_raw"] is not None else ""
        _p(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['query']:<20}{c['ratio_p50']:.2f}{raw}"
           + ("" if c["same_matches"] else "  (different numbers of matches!)"))
    _p(f"\nJSON: {json_path}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())

