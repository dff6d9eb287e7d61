"""MWL C-FIND benchmark: the broker's worklist SCP against DCMTK wlmscpfs and Orthanc.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/mwl_query.py                 # the full run
    .venv/bin/python bench/mwl_query.py --quick         # 10k items, short series: does everything work?
    .venv/bin/python bench/mwl_query.py --sizes 10000,100000,1000000 \\
        --targets broker-sqlite,broker-postgresql,wlmscpfs,orthanc --concurrency 1,10,50 --seconds 10

For each size (items from ``bench/mwl_items.py``: the same items and queries for every target) and each
target it starts the server as a subprocess on free ports, waits for a C-ECHO, and runs two queries --
*typical* (station AE + today + modality, 20 matches) and *broad* (a week of one modality, 196 matches):

1. **latency**: one ``findscu -W`` process per query, one at a time, with DCMTK's default (Nagle on) and
   with ``TCP_NODELAY=1``; the latency is taken from findscu's own log (association requested -> process
   exited), so the ~20 ms of process start is not in it;
2. **concurrency**: 1, 10 and 50 clients of the ``raw`` client (``bench/mwl_clients.py``: the same bytes in
   the same writes as findscu, at < 1 ms of CPU per query), each a loop of association + C-FIND + release,
   again with Nagle on and off.

A series runs ``--seconds`` (and at least ``--min-queries`` queries), or exactly ``--queries`` queries. It
reports p50/p99 latency, queries/s, the server's CPU time and memory (PSS and RSS over its process tree,
sampled every 0.2 s), and checks that every query returned the expected number of matches.

Targets: ``broker-sqlite`` and ``broker-postgresql`` (a fresh database, ``broker db upgrade``, bulk-loaded
items, then ``broker run``), ``wlmscpfs`` and ``orthanc`` (``*.wl`` files; run only at ``--peer-sizes``, since
they parse every file per query). The broker must answer C-ECHO on ``BROKER_DICOM_PORT``; a preflight on an
empty database checks that before any loading, and the broker targets are skipped, with the reason, if not.

Results: tables on stdout, and a JSON file (default ``bench/results/mwl-<timestamp>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.hl7_throughput import (  # noqa: E402
    RssSampler,
    _pss,
    _sigterm,
    fresh_database,
    log_problems,
    machine_facts,
    percentile,
    proc_status,
    tree_cpu_seconds,
    tree_pids,
)
from bench.mwl_clients import CLIENT_TIMEOUT, Findscu, Outcome, RawQuery, raw_query  # noqa: E402
from bench.mwl_items import (  # noqa: E402
    ITEMS_PER_DAY,
    SEED,
    STATIONS,
    QuerySpec,
    Spread,
    analyze,
    check_against_mapping,
    expected_counts,
    load_database,
    queries,
    sample_for_check,
    write_worklist_files,
)
from bench.mwl_peers import (  # noqa: E402
    BROKER_TARGETS,
    PEER_AE,
    PEERS,
    NotServing,
    Server,
    broker_settings,
    migrate,
    start_broker,
    start_orthanc,
    start_wlmscpfs,
    stop_server,
    tool_versions,
    wait_ready,
)

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TARGETS = ("broker-sqlite", "broker-postgresql", "wlmscpfs", "orthanc")
MODES = ("default", "nodelay")
LOAD_CLIENTS = ("raw", "findscu")

TARGET_P50_MS = 30.0
TARGET_FLAT_RATIO = 1.5  # our reading of "flat": p50 at 1M at most 1.5 x p50 at 10k
TARGET_SPEEDUP = 10.0
TARGET_QPS = 100.0
TARGET_QPS_CLIENTS = 50
TARGET_RSS_MB = 300.0
TARGET_TEXT = {
    "p50": f"typical query p50 <= {TARGET_P50_MS:.0f} ms at 1M items",
    "flat": f"typical query p50 flat from 10k to 1M items (read as: 1M p50 <= {TARGET_FLAT_RATIO} x 10k p50)",
    "speedup": f"at 10k items >= {TARGET_SPEEDUP:.0f}x faster (p50) than wlmscpfs and Orthanc",
    "qps": f">= {TARGET_QPS:.0f} queries/s with {TARGET_QPS_CLIENTS} concurrent clients",
    "rss": f"broker RSS <= {TARGET_RSS_MB:.0f} MB at 1M items",
}


# --------------------------------------------------------------------------------------------------
# series


@dataclasses.dataclass(frozen=True)
class Plan:
    """One series: which client, Nagle on (default) or off (nodelay), how many concurrent clients."""

    kind: str  # "latency" (findscu, one at a time) or "concurrency"
    client: str  # "findscu" or "raw"
    mode: str  # "default" or "nodelay"
    clients: int


@dataclasses.dataclass(frozen=True)
class Budget:
    seconds: float
    min_queries: int
    queries: int | None  # exactly this many (overrides seconds)

    def more(self, issued: int, elapsed: float) -> bool:
        if self.queries is not None:
            return issued < self.queries
        return elapsed < self.seconds or issued < self.min_queries


@dataclasses.dataclass
class Record:
    started: float  # offset from the series start, s
    outcome: Outcome


def plans(concurrency: Sequence[int], modes: Sequence[str], load_client: str) -> list[Plan]:
    out = [Plan("latency", "findscu", mode, 1) for mode in modes]
    out += [Plan("concurrency", load_client, mode, c) for c in concurrency for mode in modes]
    return out


MAX_CONSECUTIVE_ERRORS = 5
"""A client gives up after this many failed queries in a row (the server is down or refuses it)."""
ERROR_PAUSE = 0.1
"""Seconds a client waits after a failed query before the next one."""


def _run_raw(port: int, query: RawQuery, nodelay: bool, clients: int, budget: Budget,
             alive: Callable[[], bool]) -> tuple[list[Record], float]:
    records: list[Record] = []
    issued = 0

    async def client(t0: float) -> None:
        nonlocal issued
        failures = 0
        while budget.more(issued, time.perf_counter() - t0) and failures < MAX_CONSECUTIVE_ERRORS and alive():
            issued += 1
            started = time.perf_counter() - t0
            try:
                outcome = await asyncio.wait_for(raw_query(port, query, nodelay), CLIENT_TIMEOUT)
            except TimeoutError:
                outcome = Outcome(0, math.nan, f"no answer within {CLIENT_TIMEOUT:.0f} s")
            records.append(Record(started, outcome))
            failures = failures + 1 if outcome.error else 0
            if outcome.error:
                await asyncio.sleep(ERROR_PAUSE)

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(t0) for _ in range(clients)))
        return t0

    t0 = asyncio.run(main())
    return records, t0


def _run_findscu(findscu: Findscu, port: int, calling_ae: str, called_ae: str, nodelay: bool, clients: int,
                 budget: Budget, alive: Callable[[], bool]) -> tuple[list[Record], float]:
    records: list[Record] = []
    lock = threading.Lock()
    issued = 0
    t0 = time.perf_counter()

    def client() -> None:
        nonlocal issued
        failures = 0
        while failures < MAX_CONSECUTIVE_ERRORS and alive():
            with lock:
                if not budget.more(issued, time.perf_counter() - t0):
                    return
                issued += 1
            started = time.perf_counter() - t0
            outcome = findscu.query(port, calling_ae, called_ae, nodelay)
            with lock:
                records.append(Record(started, outcome))
            failures = failures + 1 if outcome.error else 0
            if outcome.error:
                time.sleep(ERROR_PAUSE)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return records, t0


TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "DelayedACKs")


def tcp_counters() -> dict[str, int]:
    """Linux TcpExt counters (system-wide) that explain slow connects and delayed ACKs."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
                 if line.startswith("TcpExt:")]
        values = dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=True))
    except (OSError, IndexError, ValueError):
        return {}
    return {k: values[k] for k in TCP_COUNTERS if k in values}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_series(server: Server, spec: QuerySpec, plan: Plan, expected: int, budget: Budget, findscu: Findscu,
               raw: RawQuery, sampler: RssSampler) -> dict[str, Any]:
    sampler.reset()
    cpu_before = tree_cpu_seconds(server.pid)
    # findscu processes are our children; so is the server, whose CPU would count here if it ended (reaped)
    # during the series, hence children's CPU only for the findscu client.
    children = _children_cpu if plan.client == "findscu" else (lambda: 0.0)
    client_before = time.process_time() + children()
    nodelay = plan.mode == "nodelay"
    tcp_before = tcp_counters()
    if plan.client == "raw":
        records, t0 = _run_raw(server.port, raw, nodelay, plan.clients, budget, server.alive)
    else:
        records, t0 = _run_findscu(findscu, server.port, spec.calling_ae, server.called_ae, nodelay, plan.clients,
                                   budget, server.alive)
    ended = time.perf_counter()
    tcp_after = tcp_counters()
    client_cpu = time.process_time() + children() - client_before
    cpu_after = tree_cpu_seconds(server.pid)
    sampler.sample()
    ok = [r for r in records if not r.outcome.error]
    failed = [r for r in records if r.outcome.error]
    latencies = sorted(r.outcome.latency for r in ok)
    last_end = max((r.started + r.outcome.latency for r in ok), default=math.nan)
    wall = min(last_end, ended - t0) if ok else ended - t0
    counts = Counter(r.outcome.matches for r in ok)
    server_cpu = (cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None else None
    walls = sorted(r.outcome.process_wall for r in ok if not math.isnan(r.outcome.process_wall))
    return {
        "query": spec.name,
        "kind": plan.kind,
        "client": plan.client,
        "mode": plan.mode,
        "clients": plan.clients,
        "queries": len(records),
        "completed": len(ok),
        "errors": len(failed),
        "first_error": failed[0].outcome.error if failed else "",
        "wall_s": wall,
        "queries_per_s": len(ok) / wall if ok and wall > 0 else math.nan,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else math.nan,
        "mean_ms": sum(latencies) / len(latencies) * 1000 if latencies else math.nan,
        "process_wall_p50_ms": percentile(walls, 50) * 1000 if walls else None,
        "matches": {str(k): v for k, v in sorted(counts.items())},
        "expected_matches": expected,
        "wrong_count": sum(v for k, v in counts.items() if k != expected),
        "server_cpu_s": server_cpu,
        "server_cpu_ms_per_query": server_cpu / len(ok) * 1000 if server_cpu is not None and ok else None,
        "client_cpu_s": client_cpu,
        "client_cpu_ms_per_query": client_cpu / len(records) * 1000 if records else None,
        "server_peak_mb": sampler.peaks_mb(),
        "tcp": {k: tcp_after[k] - tcp_before[k] for k in tcp_after if k in tcp_before},
    }


# --------------------------------------------------------------------------------------------------
# one target at one size


def memory_now(pid: int) -> dict[str, Any]:
    """The server's memory now: VmRSS of the main process, sums of RSS and PSS over its process tree."""
    pids = tree_pids(pid)
    mb = 2**20
    return {"main_rss_mb": (proc_status(pid, "VmRSS") or 0) / mb,
            "tree_rss_mb": sum(proc_status(p, "VmRSS") or 0 for p in pids) / mb,
            "tree_pss_mb": sum(_pss(p) or 0 for p in pids) / mb,
            "processes": len(pids)}


def _p(*parts: Any) -> None:
    print(*parts, flush=True)


OUTSIDE_STOP = (0, -signal.SIGINT, -signal.SIGTERM)
"""Exit statuses of a server that something outside the benchmark stopped ('broker run' exits 0 on SIGTERM)."""
MAX_RESTARTS = 3


class ServerGone(RuntimeError):
    """The server ended while the benchmark was using it."""


def _finish(server: Server, sampler: RssSampler | None, args: argparse.Namespace, size: int,
            suffix: str = "") -> dict[str, Any]:
    """Stops the sampler and the server; saves the server's log. Returns the stop and log facts."""
    if sampler is not None:
        sampler.stop()
    done: dict[str, Any] = {"stop": stop_server(server)}
    problems = log_problems(server.log_path)
    done["server_log"] = {"lines": problems["lines"], "problems": problems["problems"], "first": problems["first"]}
    if problems["lines"]:
        saved = args.results_dir / f"mwl-{args.stamp}-{server.target}-{size}{suffix}.log"
        args.results_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(server.log_path, saved)
        done["server_log"]["saved_as"] = str(saved)
    return done


def _gone(server: Server) -> ServerGone:
    code = server.process.returncode
    cause = " = stopped by a signal from outside the benchmark" if code in OUTSIDE_STOP else ""
    return ServerGone(f"{server.target} (pid {server.pid}) ended while in use (exit status {code}{cause})")


def serve_and_measure(start: Callable[[], Server], specs: Sequence[QuerySpec], expected: dict[str, int],
                      args: argparse.Namespace, workdir: Path, result: dict[str, Any]) -> None:
    """Starts the server, runs every series on it, stops it; fills ``result``.

    A server that something outside the benchmark stops (SIGTERM/SIGINT: it exits 0 or -15/-2) is started
    again, up to MAX_RESTARTS times, and the series it was in is run again; ``result["restarts"]`` says so.
    Any other end of the server fails the target.
    """
    todo = [(spec, plan) for spec in specs for plan in plans(args.concurrency, args.modes, args.load_client)]
    findscus = {s.name: Findscu(workdir, s.identifier(), s.name) for s in specs}
    budget = Budget(args.seconds, args.min_queries, args.queries)
    warm = Budget(0, args.warmup, args.warmup)
    restarts: list[dict[str, Any]] = result.setdefault("restarts", [])
    peaks: dict[str, float] = {}
    max_processes = 0
    server = start()
    sampler: RssSampler | None = None
    try:
        while True:
            phase = "start-up"
            try:
                try:
                    ready = wait_ready(server)
                except NotServing:
                    if server.process.returncode in OUTSIDE_STOP:
                        raise _gone(server) from None
                    raise
                result.setdefault("ready_s", ready)
                _p(f"    {server.target} pid {server.pid} answers C-ECHO on 127.0.0.1:{server.port} "
                   f"(AE {server.called_ae}) after {ready:.1f} s")
                sampler = RssSampler(server.pid)
                sampler.start()
                result.setdefault("memory", {"idle": memory_now(server.pid)})
                raws = {s.name: RawQuery(s.identifier(), s.calling_ae, server.called_ae) for s in specs}
                phase = "warm-up"
                for spec in specs:  # warm-up (caches, connection pools, page cache): not recorded
                    run_series(server, spec, Plan("warmup", "raw", "nodelay", 1), expected[spec.name], warm,
                               findscus[spec.name], raws[spec.name], sampler)
                if not server.alive():
                    raise _gone(server)
                while todo:
                    spec, plan = todo[0]
                    phase = f"the series {spec.name} {plan.client} {plan.mode} C={plan.clients}"
                    series = run_series(server, spec, plan, expected[spec.name], budget, findscus[spec.name],
                                        raws[spec.name], sampler)
                    if not server.alive():
                        raise _gone(server)
                    todo.pop(0)
                    result["series"].append(series)
                    _p(f"    {spec.name:<8}{plan.client:>8} {plan.mode:<8}{plan.clients:>3} clients: "
                       f"n {series['completed']:>5}  p50 {_fmt(series['p50_ms'])} ms  "
                       f"p99 {_fmt(series['p99_ms'])} ms  {_fmt(series['queries_per_s'])} q/s  "
                       f"matches {series['matches']}"
                       + (f"  ERRORS {series['errors']}: {series['first_error']}" if series["errors"] else "")
                       + (f"  WRONG COUNT {series['wrong_count']} (expected {series['expected_matches']})"
                          if series["wrong_count"] else ""))
                break
            except ServerGone as exc:
                if server.process.returncode not in OUTSIDE_STOP or len(restarts) >= MAX_RESTARTS:
                    raise RuntimeError(f"{exc}:\n{server.log_tail()}") from None
                if sampler is not None:
                    peaks = {k: max(peaks.get(k, 0.0), v) for k, v in sampler.peaks_mb(overall=True).items()}
                    max_processes = max(max_processes, sampler.max_processes)
                old = _finish(server, sampler, args, result["size"], f"-before-restart-{len(restarts) + 1}")
                sampler = None
                restarts.append({"reason": str(exc), "during": phase, "server_log": old["server_log"]})
                _p(f"    RESTART {len(restarts)}: {exc}; starting it again and repeating that series")
                server = start()
        assert sampler is not None
        time.sleep(1.0)
        result["memory"]["after"] = memory_now(server.pid)
        result["memory"]["peak"] = {k: max(peaks.get(k, 0.0), v) for k, v in sampler.peaks_mb(overall=True).items()}
        hwm = proc_status(server.pid, "VmHWM")
        result["memory"]["main_vmhwm_mb"] = hwm / 2**20 if hwm else None
        result["memory"]["max_processes"] = max(max_processes, sampler.max_processes)
    finally:
        result.update(_finish(server, sampler, args, result["size"]))


def run_broker(target: str, spread: Spread, specs: Sequence[QuerySpec], expected: dict[str, int],
               args: argparse.Namespace, result: dict[str, Any]) -> None:
    backend = BROKER_TARGETS[target]
    workdir = Path(tempfile.mkdtemp(prefix=f"mwlbench-{target}-", dir=args.workdir))
    try:
        with fresh_database(backend, args.pg_url, workdir) as url:
            from sqlalchemy.engine import make_url

            result["database"] = make_url(url).render_as_string(hide_password=True)
            started = time.perf_counter()
            result["migrated_by"] = migrate(url)
            result["migrate_s"] = time.perf_counter() - started
            result["broker_settings"] = broker_settings(url)
            _p(f"    database {result['database']} migrated ({result['migrated_by']}); loading {spread.size} items ...")

            def progress(n: int) -> None:
                if n % 100_000 == 0:
                    _p(f"      {n} items ({time.perf_counter() - started:.0f} s)")

            load = load_database(url, spread, method=args.load_method, progress=progress)
            if backend == "postgresql" or args.sqlite_analyze:
                load["analyze"] = "VACUUM (ANALYZE)" if backend == "postgresql" else "ANALYZE"
                load["analyze_s"] = analyze(url, vacuum=backend == "postgresql")
            result["load"] = load
            if backend == "sqlite":
                db_file = Path(make_url(url).database or "")
                load["database_mb"] = sum(p.stat().st_size for p in db_file.parent.glob(db_file.name + "*")) / 2**20
            _p(f"    loaded {load['items']} items in {load['seconds']:.1f} s "
               f"({load['items'] / load['seconds']:.0f} items/s, {load['method']})"
               + (f"; {load['analyze']} {load['analyze_s']:.1f} s" if "analyze" in load else ""))
            if args.broker_preflight.get("serving") is False:
                raise NotServing(args.broker_preflight["reason"])
            serve_and_measure(lambda: start_broker(target, url, workdir), specs, expected, args, workdir, result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_peer(target: str, worklist_root: Path, specs: Sequence[QuerySpec], expected: dict[str, int],
             args: argparse.Namespace, result: dict[str, Any]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"mwlbench-{target}-", dir=args.workdir))
    try:
        def start() -> Server:
            if target == "wlmscpfs":
                server = start_wlmscpfs(worklist_root, workdir)
            else:
                server = start_orthanc(worklist_root / PEER_AE, workdir)
            result["server_settings"] = server.settings
            return server

        serve_and_measure(start, specs, expected, args, workdir, result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def broker_preflight(args: argparse.Namespace) -> dict[str, Any]:
    """Starts ``broker run`` on an empty SQLite database: does it answer C-ECHO on BROKER_DICOM_PORT?"""
    workdir = Path(tempfile.mkdtemp(prefix="mwlbench-preflight-", dir=args.workdir))
    url = f"sqlite:///{workdir / 'empty.db'}"
    try:
        migrated_by = migrate(url)
        for attempt in range(1, MAX_RESTARTS + 2):
            server = start_broker("broker-preflight", url, workdir)
            try:
                ready = wait_ready(server)
                return {"serving": True, "ready_s": ready, "migrated_by": migrated_by, "attempts": attempt}
            except NotServing as exc:
                if server.process.returncode not in OUTSIDE_STOP or attempt > MAX_RESTARTS:
                    return {"serving": False, "reason": str(exc), "migrated_by": migrated_by, "attempts": attempt}
                _p(f"  the broker was stopped from outside (exit {server.process.returncode}); trying again")
            finally:
                stop_server(server)
        raise AssertionError("unreachable")
    except RuntimeError as exc:
        return {"serving": False, "reason": str(exc)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# one size


def run_size(size: int, args: argparse.Namespace, report: dict[str, Any]) -> None:
    spread = Spread(size, args.today, args.seed)
    specs = queries(spread.today)
    entry: dict[str, Any] = {"size": size, "spread": spread.describe(), "targets": []}
    report["sizes"].append(entry)
    _p(f"\n=== {size} items: {spread.days} days {spread.first_day} .. {spread.last_day} ===")
    started = time.perf_counter()
    expected = expected_counts(spread, specs)
    entry["expected_matches"] = expected
    _p(f"  expected matches {expected} (counted on the generated items in {time.perf_counter() - started:.1f} s); "
       f"{check_against_mapping(sample_for_check(spread))} sample items equal the broker's mapping of their order")
    targets = [t for t in args.targets if t not in PEERS or size in args.peer_sizes]
    skipped_peers = [t for t in args.targets if t not in targets]
    for target in skipped_peers:
        entry["targets"].append({"target": target, "size": size, "status": "skipped",
                                 "reason": f"peers run only at --peer-sizes {args.peer_sizes}", "series": []})
    wl_root: Path | None = None
    try:
        if any(t in PEERS for t in targets):
            wl_root = Path(tempfile.mkdtemp(prefix=f"mwlbench-wl-{size}-", dir=args.workdir))
            _p(f"  writing {size} worklist files to {wl_root / PEER_AE} ...")
            entry["worklist_files"] = write_worklist_files(
                wl_root / PEER_AE, spread, lambda n: _p(f"    {n} files") if n % 50_000 == 0 else None)
            files = entry["worklist_files"]
            _p(f"  wrote {files['files']} files ({files['bytes'] / 2**20:.0f} MB) in {files['seconds']:.1f} s")
        for target in targets:
            _p(f"  --- {target} ---")
            result: dict[str, Any] = {"target": target, "size": size, "status": "ok", "series": []}
            entry["targets"].append(result)
            try:
                if target in BROKER_TARGETS:
                    if args.broker_preflight.get("serving") is False and not args.always_load:
                        raise NotServing(args.broker_preflight["reason"])
                    run_broker(target, spread, specs, expected, args, result)
                else:
                    assert wl_root is not None
                    run_peer(target, wl_root, specs, expected, args, result)
            except NotServing as exc:
                result["status"] = "skipped"
                result["reason"] = str(exc)
                _p(f"    SKIPPED: {str(exc).splitlines()[0]}")
            except Exception as exc:
                result["status"] = "failed"
                result["reason"] = f"{type(exc).__name__}: {exc}"
                _p(f"    FAILED: {result['reason']}")
    finally:
        if wl_root is not None:
            shutil.rmtree(wl_root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# report


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _all_targets(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for entry in report["sizes"]:
        yield from entry["targets"]


def _series(result: dict[str, Any], query: str, kind: str, mode: str, clients: int) -> dict[str, Any] | None:
    for s in result["series"]:
        if (s["query"], s["kind"], s["mode"], s["clients"]) == (query, kind, mode, clients):
            return s
    return None


def _find(report: dict[str, Any], target: str, size: int) -> dict[str, Any] | None:
    for result in _all_targets(report):
        if result["target"] == target and result["size"] == size and result["status"] == "ok":
            return result
    return None


def _p50(report: dict[str, Any], target: str, size: int, query: str, mode: str = "default") -> float | None:
    result = _find(report, target, size)
    series = _series(result, query, "latency", mode, 1) if result else None
    value = series["p50_ms"] if series and series["completed"] else None
    return None if value is None or math.isnan(value) else float(value)


def consistency(report: dict[str, Any]) -> list[str]:
    """Warnings: a query that returned other than the expected count, or targets that disagree."""
    warnings = []
    for entry in report["sizes"]:
        seen: dict[str, dict[str, set[int]]] = {}
        for result in entry["targets"]:
            for s in result["series"]:
                counts = {int(k) for k in s["matches"]}
                seen.setdefault(s["query"], {}).setdefault(result["target"], set()).update(counts)
                if s["wrong_count"]:
                    warnings.append(f"{result['target']} {entry['size']} {s['query']} {s['client']} {s['mode']} "
                                    f"C={s['clients']}: {s['wrong_count']} queries returned other than "
                                    f"{s['expected_matches']} matches: {s['matches']}")
        for query, by_target in seen.items():
            distinct = {frozenset(v) for v in by_target.values()}
            if len(distinct) > 1:
                warnings.append(f"MISMATCH at {entry['size']} items, {query} query: targets returned different "
                                f"numbers of matches: { {t: sorted(v) for t, v in by_target.items()} }")
    return warnings


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The worklist's performance targets, each PASS / FAIL / n/a with the figures it rests on."""
    sizes = [e["size"] for e in report["sizes"]]
    big, small = (1_000_000, 10_000)
    out: list[dict[str, Any]] = []
    for target in (t for t in BROKER_TARGETS if t in report["settings"]["targets"]):
        p50_big = _p50(report, target, big, "typical")
        out.append({"target": TARGET_TEXT["p50"], "broker": target, "value": p50_big,
                    "nodelay": _p50(report, target, big, "typical", "nodelay"),
                    "ok": None if p50_big is None else p50_big <= TARGET_P50_MS})
        p50_small = _p50(report, target, small, "typical")
        ratio = p50_big / p50_small if p50_big is not None and p50_small else None
        out.append({"target": TARGET_TEXT["flat"], "broker": target, "value": ratio,
                    "p50_by_size": {s: _p50(report, target, s, "typical") for s in sizes},
                    "ok": None if ratio is None else ratio <= TARGET_FLAT_RATIO})
        for query in ("typical", "broad"):
            mine = _p50(report, target, small, query)
            peers = {peer: _p50(report, peer, small, query) for peer in PEERS}
            speedups = {peer: (p / mine if p is not None and mine else None) for peer, p in peers.items()}
            known = [v for v in speedups.values() if v is not None]
            out.append({"target": TARGET_TEXT["speedup"] + f" ({query})", "broker": target, "value": speedups,
                        "ok": None if len(known) < len(PEERS) else min(known) >= TARGET_SPEEDUP})
        for size in sizes:
            result = _find(report, target, size)
            for query in ("typical", "broad"):
                series = _series(result, query, "concurrency", "default", TARGET_QPS_CLIENTS) if result else None
                if series is None:
                    continue
                qps = series["queries_per_s"]
                out.append({"target": TARGET_TEXT["qps"] + f" ({query}, {size} items)", "broker": target,
                            "value": qps, "errors": series["errors"],
                            "ok": None if math.isnan(qps) else qps >= TARGET_QPS and not series["errors"]})
        result = _find(report, target, big)
        rss = result["memory"]["peak"]["tree"] if result and "memory" in result else None
        out.append({"target": TARGET_TEXT["rss"], "broker": target, "value": rss,
                    "pss": result["memory"]["peak"]["tree_pss"] if result and "memory" in result else None,
                    "ok": None if rss is None else rss <= TARGET_RSS_MB})
    return out


def print_report(report: dict[str, Any]) -> None:
    facts = report["machine"]
    line = "=" * 132
    _p("\n" + line)
    _p(f"MWL C-FIND benchmark  {report['started']}  nproc {facts['nproc']}  calibration (10M-iteration loop) "
       f"{facts['calibration_loop_10m_s']:.3f} s  load average before {facts['loadavg_before'][0]:.2f}")
    _p(f"items: {len(STATIONS)} stations, {ITEMS_PER_DAY} items/day; today = {report['settings']['today']}")
    for q in report["queries"]:
        _p(f"  {q['name']:<8} {q['keys']} (calling AE {q['calling_ae']}): {q['description']}")
    preflight = report["broker_preflight"]
    if preflight and not preflight.get("serving"):
        reason = (preflight.get("reason") or "?").splitlines()[0]
        _p(f"\nBROKER NOT MEASURED: 'broker run' does not serve C-FIND yet: {reason}")

    _p("\nLoads")
    header = f"{'target':<19}{'size':>9}{'load s':>9}{'items/s':>9}{'analyze s':>10}{'DB MB':>8}{'wl files s':>11}" \
             f"{'ready s':>9}  status"
    _p(header)
    _p("-" * len(header))
    for entry in report["sizes"]:
        files = entry.get("worklist_files")
        for r in entry["targets"]:
            load = r.get("load", {})
            _p(f"{r['target']:<19}{r['size']:>9}{_fmt(load.get('seconds')):>9}"
               f"{_fmt(load['items'] / load['seconds'] if load else None, '.0f'):>9}{_fmt(load.get('analyze_s')):>10}"
               f"{_fmt(load.get('database_mb'), '.0f'):>8}"
               f"{_fmt(files['seconds'] if files and r['target'] in PEERS else None):>11}{_fmt(r.get('ready_s')):>9}"
               f"  {r['status']}" + (f": {r['reason'].splitlines()[0][:70]}" if r.get("reason") else ""))

    _p("\nLatency, one query at a time: findscu -W, a new process per query (as a modality connects); latency ="
       " association requested -> findscu exited, in ms")
    header = (f"{'target':<19}{'size':>9}  {'query':<8}{'n':>5}{'p50':>8}{'p99':>8}{'max':>8}   | TCP_NODELAY=1"
              f"{'n':>5}{'p50':>8}{'p99':>8}{'max':>8}  | process p50{'matches':>12}")
    _p(header)
    _p("-" * len(header))
    for r in _all_targets(report):
        for query in ("typical", "broad"):
            d = _series(r, query, "latency", "default", 1)
            n = _series(r, query, "latency", "nodelay", 1)
            if not d and not n:
                continue
            row = f"{r['target']:<19}{r['size']:>9}  {query:<8}"
            for s in (d, n):
                row += (f"{s['completed']:>5}{_fmt(s['p50_ms']):>8}{_fmt(s['p99_ms']):>8}{_fmt(s['max_ms']):>8}"
                        if s else f"{'':>29}")
                row += "   | " + " " * 13 if s is d else "  | "
            anyone = d or n
            assert anyone is not None
            row += f"{_fmt(anyone['process_wall_p50_ms']):>11}{','.join(anyone['matches']):>12}"
            _p(row)

    _p("\nConcurrency: C clients of the raw client, each a loop of association + C-FIND + release; Nagle on "
       "(default) | off (TCP_NODELAY); latency ms")
    header = (f"{'target':<19}{'size':>9}  {'query':<8}{'C':>3}{'n':>6}{'p50':>8}{'p99':>8}{'q/s':>8}  |"
              f"{'n':>6}{'p50':>8}{'p99':>8}{'q/s':>8}  |{'errors':>7}{'srv CPU/q':>10}{'cli CPU/q':>10}"
              f"{'peak PSS':>9}{'lis.ovf':>8}")
    _p(header)
    _p("-" * len(header))
    for r in _all_targets(report):
        for query in ("typical", "broad"):
            for clients in sorted({s["clients"] for s in r["series"] if s["kind"] == "concurrency"}):
                d = _series(r, query, "concurrency", "default", clients)
                n = _series(r, query, "concurrency", "nodelay", clients)
                both = [s for s in (d, n) if s]
                if not both:
                    continue
                row = f"{r['target']:<19}{r['size']:>9}  {query:<8}{clients:>3}"
                for s in (d, n):
                    row += (f"{s['completed']:>6}{_fmt(s['p50_ms']):>8}{_fmt(s['p99_ms']):>8}"
                            f"{_fmt(s['queries_per_s']):>8}  |" if s else f"{'':>30}  |")
                srv = [s["server_cpu_ms_per_query"] for s in both if s["server_cpu_ms_per_query"] is not None]
                cli = [s["client_cpu_ms_per_query"] for s in both if s["client_cpu_ms_per_query"] is not None]
                row += (f"{sum(s['errors'] for s in both):>7}{_fmt(sum(srv) / len(srv) if srv else None):>10}"
                        f"{_fmt(sum(cli) / len(cli) if cli else None):>10}"
                        f"{_fmt(max(s['server_peak_mb']['tree_pss'] for s in both), '.0f'):>9}"
                        f"{sum(s['tcp'].get('ListenOverflows', 0) for s in both):>8}")
                _p(row)

    _p("\nServer memory, MB: idle = after start, before any query; peak = during the queries (sampled every 0.2 s);"
       " after = 1 s after the last query")
    header = (f"{'target':<19}{'size':>9}{'idle PSS':>10}{'idle RSS':>10}{'peak PSS':>10}{'peak RSS':>10}"
              f"{'after PSS':>10}{'after RSS':>10}{'main HWM':>10}{'procs':>7}")
    _p(header)
    _p("-" * len(header))
    for r in _all_targets(report):
        memory = r.get("memory")
        if not memory or "peak" not in memory:
            continue
        idle, peak, after = memory["idle"], memory["peak"], memory["after"]
        _p(f"{r['target']:<19}{r['size']:>9}{_fmt(idle['tree_pss_mb'], '.0f'):>10}"
           f"{_fmt(idle['tree_rss_mb'], '.0f'):>10}{_fmt(peak['tree_pss'], '.0f'):>10}{_fmt(peak['tree'], '.0f'):>10}"
           f"{_fmt(after['tree_pss_mb'], '.0f'):>10}"
           f"{_fmt(after['tree_rss_mb'], '.0f'):>10}{_fmt(memory.get('main_vmhwm_mb'), '.0f'):>10}"
           f"{memory['max_processes']:>7}")

    sizes = [e["size"] for e in report["sizes"]]
    peer_size = min((s for s in sizes if any(_find(report, p, s) for p in PEERS)), default=None)
    if peer_size is not None:
        _p(f"\nBroker vs peers at {peer_size} items: p50 latency (findscu, one at a time) and how many times faster "
           "the broker is")
        header = f"{'query':<9}{'client':<15}" + "".join(f"{t:>19}" for t in TARGETS) + "".join(
            f"{'x vs ' + p:>15}" for p in PEERS)
        _p(header)
        _p("-" * len(header))
        for query in ("typical", "broad"):
            for mode in MODES:
                values = {t: _p50(report, t, peer_size, query, mode) for t in TARGETS}
                row = f"{query:<9}{'default' if mode == 'default' else 'TCP_NODELAY=1':<15}"
                row += "".join(f"{_fmt(values[t]):>19}" for t in TARGETS)
                for peer in PEERS:
                    theirs = values[peer]
                    ratios = [_fmt(theirs / mine) if theirs and mine else "-"
                              for mine in (values[b] for b in BROKER_TARGETS)]
                    row += f"{'/'.join(ratios):>15}"
                _p(row)
        _p("(x vs peer: peer p50 / broker p50, for broker-sqlite/broker-postgresql)")

    _p("\nTargets")
    for t in report["targets"]:
        value = t["value"]
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) if isinstance(value, dict) else _fmt(value)
        extra = f" (TCP_NODELAY=1: {_fmt(t['nodelay'])})" if "nodelay" in t else ""
        _p(f"  {({True: 'PASS', False: 'FAIL', None: 'n/a '})[t['ok']]}  {t['broker']:<18} {t['target']}: "
           f"{shown}{extra}")
    for warning in report["warnings"]:
        _p(f"WARNING: {warning}")
    for r in _all_targets(report):
        log = r.get("server_log") or {}
        if r["target"] in BROKER_TARGETS and log.get("problems"):
            _p(f"{r['target']} {r['size']}: the broker logged {log['problems']} warning/error line(s); first: "
               f"{log['first'][0][:200]}")
        for restart in r.get("restarts", []):
            _p(f"{r['target']} {r['size']}: RESTARTED during {restart['during']}: {restart['reason']}")
        if r["status"] == "failed":
            _p(f"{r['target']} {r['size']}: FAILED: {r['reason'][:500]}")
    _p(f"\nJSON: {report['json']}")


# --------------------------------------------------------------------------------------------------
# main


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("values are integers >= 1")
    return values


def _choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values or any(v not in choices for v in values):
            raise argparse.ArgumentTypeError(f"a comma-separated subset of {', '.join(choices)}")
        return values
    return parse


def _day(text: str) -> date:
    return datetime.strptime(text, "%Y%m%d").date()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=_int_list, default=[10_000, 100_000, 1_000_000],
                        help="item counts, one run of every target each (default 10000,100000,1000000)")
    parser.add_argument("--targets", type=_choice_list(TARGETS), default=list(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)} (default all)")
    parser.add_argument("--peer-sizes", type=_int_list, default=[10_000],
                        help="sizes at which wlmscpfs and Orthanc run (default 10000: they parse every file per "
                             "query, ~0.5 s at 10k items, so 100k means ~5 s per query)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 10, 50],
                        help="concurrent clients of the concurrency series (default 1,10,50)")
    parser.add_argument("--modes", type=_choice_list(MODES), default=list(MODES),
                        help="default (Nagle on, as DCMTK and most modalities) and/or nodelay (default both)")
    parser.add_argument("--load-client", choices=LOAD_CLIENTS, default="raw",
                        help="client of the concurrency series (default raw; findscu = a process per query)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each series (default 10)")
    parser.add_argument("--min-queries", type=int, default=20,
                        help="each series runs at least this many queries (default 20)")
    parser.add_argument("--queries", type=int, default=None,
                        help="run exactly this many queries per series instead of --seconds")
    parser.add_argument("--warmup", type=int, default=3, help="unrecorded queries per query kind first (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="10k items, concurrency 1,10, 3-s series of at least 5 queries: a check that it all works")
    parser.add_argument("--today", type=_day, default=date.today(), help="the day of the queries, YYYYMMDD")
    parser.add_argument("--seed", type=int, default=SEED, help=f"item generator seed (default {SEED})")
    parser.add_argument("--load-method", choices=("auto", "executemany", "copy"), default="auto",
                        help="bulk load: auto = COPY on PostgreSQL, executemany on SQLite")
    parser.add_argument("--sqlite-analyze", action="store_true",
                        help="run ANALYZE on the SQLite database after loading (PostgreSQL always gets "
                             "VACUUM ANALYZE, as autovacuum would do soon after such a load)")
    parser.add_argument("--always-load", action="store_true",
                        help="load the broker's databases even when the preflight found no DICOM service")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"PostgreSQL server (default {DEFAULT_PG_URL})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where databases and worklist files go (default the system temp directory; 1M items "
                             "are ~5 GB of SQLite)")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default bench/results/mwl-<timestamp>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.peer_sizes, args.concurrency = [10_000], [10_000], [1, 10]
        args.seconds, args.min_queries, args.warmup = 3.0, 5, 1
    if args.queries is not None and args.queries < 1:
        parser.error("--queries must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)
    started = datetime.now(UTC)
    args.stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path: Path = args.json or ROOT / "bench" / "results" / f"mwl-{args.stamp}.json"
    args.results_dir = json_path.parent
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    specs = queries(args.today)
    _p("calibrating ...")
    report: dict[str, Any] = {
        "benchmark": "mwl_query",
        "started": started.isoformat(timespec="seconds"),
        "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        "settings": {k: (str(v) if isinstance(v, Path | date) else v) for k, v in vars(args).items()
                     if k not in ("results_dir",)},
        "queries": [{"name": q.name, "keys": q.keys_text(), "calling_ae": q.calling_ae, "description": q.description}
                    for q in specs],
        "targets_text": TARGET_TEXT,
        "tools": tool_versions(),
        "inherited_broker_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("BROKER_")},
        "machine": machine_facts(),
        "broker_preflight": {},
        "sizes": [],
        "json": str(json_path),
    }
    interrupted = False
    try:
        if any(t in BROKER_TARGETS for t in args.targets):
            _p("broker preflight: does 'broker run' answer C-ECHO on BROKER_DICOM_PORT? ...")
            report["broker_preflight"] = args.broker_preflight = broker_preflight(args)
            if report["broker_preflight"]["serving"]:
                _p(f"  yes, after {report['broker_preflight']['ready_s']:.1f} s")
            else:
                _p("  NO: the broker targets are " + ("loaded, then skipped" if args.always_load else "skipped")
                   + ":\n    " + report["broker_preflight"]["reason"].replace("\n", "\n    "))
        else:
            args.broker_preflight = {}
        for size in args.sizes:
            run_size(size, args, report)
    except KeyboardInterrupt:
        interrupted = True
        _p("\ninterrupted: servers stopped, databases and files removed")
    report["interrupted"] = interrupted
    report["warnings"] = consistency(report)
    report["targets"] = evaluate_targets(report)
    report["failed"] = interrupted or any(r["status"] == "failed" or any(s["errors"] for s in r["series"])
                                          for r in _all_targets(report))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print_report(report)
    return 1 if report["failed"] or report["warnings"] else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
