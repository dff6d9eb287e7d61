"""In-process profile of the HL7 intake: CPU time and SQL statements per ORM^O01, without MLLP.

Run it by hand from the repository root (it is not a test and is never collected by pytest)::

    .venv/bin/python bench/hl7_profile.py --backend sqlite --messages 2000
    .venv/bin/python bench/hl7_profile.py --backend postgresql --messages 2000
    py-spy record -o out.svg -r 500 -- .venv/bin/python bench/hl7_profile.py --messages 2000

``bench/hl7_throughput.py`` measures the whole broker over TCP, on a machine whose CPU speed varies
by a factor of two between minutes; one wall-clock run there says little about a change of a tenth
of a millisecond. This script calls the intake that ``broker run`` builds (:func:`broker.intake.build.build_intake`,
the same engines, mappings and group-commit setting) directly, one message after the other as one
MLLP connection would, and reports what does not depend on the machine's mood: user and system CPU
per message and the statements sent to the database per message (counted with SQLAlchemy's
``before_cursor_execute`` event on both engines; BEGIN and COMMIT are not counted).
``--warmup`` messages run first and are not counted (caches, the first patients of the 2,000).

Statements are counted on ``--count`` further messages after the timed ones: a cursor event
listener switches on SQLAlchemy's event dispatch for every statement of its engine, which would
inflate the timed CPU (the broker's engines listen to no statement events).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hl7_throughput import (  # noqa: E402 - after the path set-up above
    DEFAULT_PG_URL,
    SAMPLE,
    MessageFactory,
    fresh_database,
    migrate,
)


def _count_statements(engine: Any, counter: collections.Counter[str]) -> None:
    """Count every statement ``engine`` sends, by its first word (SELECT, INSERT, ...)."""
    from sqlalchemy import event

    @event.listens_for(engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
        counter[word] += 1


def run(backend: str, messages: int, warmup: int, count: int, pg_url: str, seed: int | None,
        show: bool) -> dict[str, float]:
    """Intake ``warmup`` + ``messages`` + ``count`` new orders on a fresh database: CPU per message of
    the ``messages``, statements per message of the ``count``."""
    factory = MessageFactory(SAMPLE.read_bytes(), seed)
    batch = factory.build(warmup + messages + count)
    with tempfile.TemporaryDirectory(prefix="hl7prof-") as tmp, \
            fresh_database(backend, pg_url, Path(tmp)) as url:
        migrate(url)
        os.environ["BROKER_DATABASE_URL"] = url
        os.environ.setdefault("BROKER_LOG_LEVEL", "WARNING")  # as bench/hl7_throughput.py runs the broker
        os.chdir(ROOT)  # config/broker.yaml and mappings/, as 'broker run' from the repository root
        from broker import logs
        from broker.config import load_settings
        from broker.intake.build import build_intake

        settings = load_settings()
        logs.configure(settings.log_format, settings.log_level, settings.log_patient_data)
        intake = build_intake(settings)
        peer = ("127.0.0.1", 40000)
        for raw in batch[:warmup]:
            _check(intake(raw, peer))
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        for raw in batch[warmup:warmup + messages]:
            _check(intake(raw, peer))
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        counter: collections.Counter[str] = collections.Counter()
        for engine in {intake.engine, intake.archive_engine}:
            _count_statements(engine, counter)
        for raw in batch[warmup + messages:]:
            _check(intake(raw, peer))
        if show:
            print(f"  statements: {dict(sorted(counter.items()))}")
        intake.engine.dispose()
        intake.archive_engine.dispose()
    return {"wall_ms": wall / messages * 1000,
            "user_ms": (after.ru_utime - before.ru_utime) / messages * 1000,
            "system_ms": (after.ru_stime - before.ru_stime) / messages * 1000,
            "statements": sum(counter.values()) / max(count, 1)}


def _check(replies: list[bytes]) -> None:
    if len(replies) != 1 or b"MSA|AA|" not in replies[0]:
        raise SystemExit(f"unexpected reply: {replies!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--count", type=int, default=300, help="messages on which statements are counted")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no per-statement-kind breakdown")
    args = parser.parse_args(argv)
    result = run(args.backend, args.messages, args.warmup, args.count, args.pg_url, args.seed, not args.quiet)
    print(f"{args.backend}: {args.messages} ORM^O01 in-process, per message: "
          f"wall {result['wall_ms']:.3f} ms, CPU user {result['user_ms']:.3f} ms + system "
          f"{result['system_ms']:.3f} ms = {result['user_ms'] + result['system_ms']:.3f} ms, "
          f"{result['statements']:.2f} statements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
