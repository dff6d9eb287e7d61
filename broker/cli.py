"""The ``broker`` command: run the broker, migrate its database, test a mapping, look at events and
procedures."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from broker import __version__

if TYPE_CHECKING:
    from broker.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="Modality worklist and workflow broker")
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the broker (HL7 listener)")
    commands.add_parser("web", help="start only the HTTP server (status board and REST API)")
    worker = commands.add_parser("worker", help="start a Celery worker on BROKER_REDIS_URL")
    worker.add_argument("--concurrency", type=int, default=2)
    db = commands.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="migrate the database to the newest schema")
    purge = db.add_parser("purge", help="apply the retention settings now and print what was removed")
    purge.add_argument("--dry-run", action="store_true", help="count what would be removed, change nothing")
    backup = db.add_parser("backup", help="copy the database to FILE consistently, also while the broker runs "
                                          "(SQLite: the backup API; PostgreSQL: pg_dump -Fc)")
    backup.add_argument("file", type=Path)
    restore = db.add_parser("restore", help="put a backup FILE into the configured database (stop the broker "
                                            "first; PostgreSQL: pg_restore --clean)")
    restore.add_argument("file", type=Path)
    mapping = commands.add_parser("mapping", help="HL7 -> DICOM mapping tools")
    mapping_commands = mapping.add_subparsers(dest="mapping_command", required=True)
    test = mapping_commands.add_parser("test", help="print the worklist item(s) a message would produce, "
                                                    "without storing anything")
    test.add_argument("file", type=Path, help="an HL7 message file (segments separated by CR or LF)")
    test.add_argument("--json", action="store_true", help="print DICOM JSON instead of a dump")
    events = commands.add_parser("events", help="the outbox: side effects after commit")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    events_commands.add_parser("failed", help="list the events that failed after every attempt")
    retry = events_commands.add_parser("retry", help="try a failed event again (attempts reset)")
    retry.add_argument("id", help="the event's id (first column of 'broker events failed') or event id")
    procedure = commands.add_parser("procedure", help="a procedure's state and timeline")
    procedure.add_argument("accession", help="the Accession Number")
    procedure.add_argument("--json", action="store_true", help="print JSON")
    token = commands.add_parser("token", help="API tokens").add_subparsers(dest="token_command", required=True)
    token_hash = token.add_parser("hash", help="print the BROKER_API_TOKENS_FILE line of a token read from "
                                               "standard input (the file holds its SHA-256, not the token)")
    token_hash.add_argument("--role", choices=("read", "write", "audit"), default="read")
    token_hash.add_argument("--label", default="", help="who uses the token (shown in logs and audit records)")
    audit = commands.add_parser("audit", help="search the audit trail (newest first)")
    audit.add_argument("--since", type=_moment, help="recorded at or after (ISO date or date-time, local time)")
    audit.add_argument("--until", type=_moment, help="recorded before (ISO date or date-time, local time)")
    audit.add_argument("--patient", default="", help="Patient ID (with or without ^^^issuer)")
    audit.add_argument("--user", default="", help="the requestor: AE title, application^facility, token <label>")
    audit.add_argument("--event", default="", type=_event_name,
                       help="application, order, patient, procedure, query, security, or an EventID code")
    audit.add_argument("--limit", type=int, default=100)
    audit_output = audit.add_mutually_exclusive_group()
    audit_output.add_argument("--json", action="store_true", help="one JSON object per line")
    audit_output.add_argument("--xml", action="store_true", help="print the DICOM audit messages")
    wl = commands.add_parser("import-worklist", help="load a folder of .wl worklist files once (a migration "
                                                     "from wlmscpfs or Orthanc's worklist plugin)")
    wl.add_argument("folder", type=Path)
    wl.add_argument("--dry-run", action="store_true", help="read the files and print what would happen, "
                                                          "change nothing")
    config = commands.add_parser("config", help="settings").add_subparsers(dest="config_command", required=True)
    config.add_parser("show", help="print the effective settings")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``broker`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from broker import logs
    from broker.config import SettingsError, StartupError, load_settings
    from broker.mapping.rules import MappingError

    try:
        settings = load_settings()
        logs.configure(settings.log_format, settings.log_level, settings.log_patient_data)
        if args.command == "run":
            asyncio.run(_run(settings))
        elif args.command == "web":
            from broker.web.server import serve_alone

            asyncio.run(serve_alone(settings))
        elif args.command == "worker":
            if not settings.redis_url:
                raise StartupError("'broker worker' needs BROKER_REDIS_URL; with it empty, 'broker run' "
                                   "processes tasks in-process")
            from workers.celery_app import make_celery

            make_celery(settings).worker_main(["worker", "--loglevel", settings.log_level,
                                               "--concurrency", str(args.concurrency)])
        elif args.command == "db":
            return _db(args, settings)
        elif args.command == "mapping":
            from broker.intake.preview import preview

            print(preview(args.file.read_bytes(), settings, as_json=args.json))
        elif args.command == "events":
            from broker.reports import failed_events, retry_event
            from broker.store.session import make_engine

            engine = make_engine(settings.database_url, pool_size=1)
            if args.events_command == "failed":
                print(failed_events(engine))
            elif not retry_event(engine, args.id):
                print(f"broker: no failed event {args.id}", file=sys.stderr)
                return 1
            else:
                print(f"event {args.id} is pending again")
        elif args.command == "procedure":
            from broker.reports import procedure_report
            from broker.store.session import make_engine

            report = procedure_report(make_engine(settings.database_url, pool_size=1), args.accession, args.json)
            if report is None:
                print(f"broker: no procedure with accession number {args.accession}", file=sys.stderr)
                return 1
            print(report)
        elif args.command == "token":
            from broker.web.auth import token_line

            secret = sys.stdin.readline().rstrip("\r\n")
            if len(secret) < 16:
                raise StartupError("a token has at least 16 characters (give it on standard input)")
            print(token_line(secret, args.role, " ".join(args.label.split())))
        elif args.command == "audit":
            from broker.audit.report import audit_report
            from broker.store.session import make_engine

            print(audit_report(make_engine(settings.database_url, pool_size=1), settings, since=args.since,
                               until=args.until, patient=args.patient, user=args.user, event=args.event,
                               limit=args.limit, output="json" if args.json else "xml" if args.xml else "table"))
        elif args.command == "import-worklist":
            return _import_worklist(args, settings)
        elif args.command == "config":
            print(json.dumps(settings.model_dump(mode="json"), indent=2))
    except (SettingsError, StartupError, MappingError) as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"broker: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "),
              file=sys.stderr)
        return 2
    return 0


def _db(args: argparse.Namespace, settings: Settings) -> int:
    """``broker db upgrade | purge | backup | restore``; returns the exit status."""
    from broker.retention.backup import BackupError, backup, restore
    from broker.store.session import make_engine

    if args.db_command == "upgrade":
        from broker.store import migrate

        migrate.upgrade(make_engine(settings.database_url))
        print("database is at the newest schema")
    elif args.db_command == "purge":
        from broker.retention import apply_retention

        engine = make_engine(settings.database_url, pool_size=1)
        try:
            report = apply_retention(settings, engine, datetime.now(), dry_run=args.dry_run)
        finally:
            engine.dispose()
        print("dry run: nothing was changed; would remove:" if args.dry_run else "removed:")
        print("\n".join(report.lines()))
    else:
        try:
            if args.db_command == "backup":
                result = backup(settings.database_url, args.file)
                print(f"backup written to {result.path} ({result.size} bytes, {result.method})")
            else:
                method = restore(settings.database_url, args.file)
                print(f"restored {args.file} into the configured database ({method})")
        except BackupError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return 1
    return 0


def _import_worklist(args: argparse.Namespace, settings: Settings) -> int:
    """``broker import-worklist DIR [--dry-run]``: a progress bar on the console, then the summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from broker.store.session import make_engine
    from broker.worklist_files.importer import import_folder
    from broker.worklist_files.intake import FileIntake

    if not args.folder.is_dir():
        print(f"broker: not a folder: {args.folder}", file=sys.stderr)
        return 2
    # (each statement planned for its values, as the HL7 intake's: a generic plan made while the tables
    # were empty can walk a whole table once thousands of orders are in)
    engine = make_engine(settings.database_url, pool_size=2, plan_each_execution=True)
    intake = FileIntake(engine, on_delete=settings.worklist_on_delete, audit=settings.audit_enabled,
                        ae_title=settings.ae_title)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task("reading" if args.dry_run else "importing", total=None)
            summary = import_folder(intake, args.folder, dry_run=args.dry_run,
                                    total=lambda n: bar.update(task, total=n),
                                    progress=lambda _: bar.advance(task))
    finally:
        engine.dispose()
    if args.dry_run:
        print("dry run: nothing was changed")
    print("\n".join(summary.lines(dry_run=args.dry_run)))
    return 0


def _event_name(text: str) -> str:
    """An audit event name or EventID code, checked when the command line is read."""
    from broker.audit.search import event_code

    if not text:
        return text
    try:
        event_code(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _moment(text: str) -> datetime:
    """An ISO date or date-time given on the command line (local time)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from exc


async def _run(settings: object) -> None:
    from broker.runtime import serve

    await serve(settings)  # type: ignore[arg-type]
