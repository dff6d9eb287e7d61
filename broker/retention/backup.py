"""Backup and restore of the broker's database while (backup) or after (restore) it runs.

- SQLite: the online backup API (``sqlite3.Connection.backup``) copies the database in one step, a
  read transaction on a WAL snapshot, so the copy is consistent even while the broker writes (writers
  are not blocked in WAL mode). The copy is written beside the target and renamed over it only when
  complete and checked (``PRAGMA quick_check``), and switched to a rollback journal so it is one
  self-contained file.
- PostgreSQL: ``pg_dump -Fc`` (the custom format, for ``pg_restore``), which reads one consistent
  snapshot. It needs the PostgreSQL client programs (Debian: ``postgresql-client``) of the server's
  major version or newer; the password, if the URL has one, is passed in ``PGPASSWORD``, never on the
  command line.

Restore puts a backup back into the configured database, with the broker stopped: SQLite copies the
file in with the same backup API, PostgreSQL runs ``pg_restore --clean --if-exists --no-owner``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url


class BackupError(Exception):
    """The backup or restore failed; the message is one line for the operator."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    size: int
    method: str  # "sqlite backup API" or "pg_dump -Fc"


def backup(database_url: str, target: Path) -> BackupResult:
    """Copy the database of ``database_url`` to ``target`` consistently."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_backup(_sqlite_path(url), target)
    if url.get_backend_name() == "postgresql":
        _run_client("pg_dump", ["-Fc", "--no-owner", "-f", str(target)], url)
        return BackupResult(target, target.stat().st_size, "pg_dump -Fc")
    raise BackupError(f"no backup for the {url.get_backend_name()} database")


def restore(database_url: str, source: Path) -> str:
    """Put the backup ``source`` into the database of ``database_url`` (the broker stopped); returns how."""
    if not source.is_file():
        raise BackupError(f"no backup file {source}")
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        path = _sqlite_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as src, sqlite3.connect(path) as dst:
            src.backup(dst)
        return "sqlite backup API"
    if url.get_backend_name() == "postgresql":
        _run_client("pg_restore", ["--clean", "--if-exists", "--no-owner", "--exit-on-error", str(source)], url)
        return "pg_restore"
    raise BackupError(f"no restore for the {url.get_backend_name()} database")


def _sqlite_path(url: URL) -> Path:
    if not url.database or url.database == ":memory:":
        raise BackupError("an in-memory SQLite database has nothing to back up")
    return Path(url.database)


def _sqlite_backup(path: Path, target: Path) -> BackupResult:
    if not path.is_file():
        raise BackupError(f"no SQLite database at {path}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy)  # pages=-1: all in one step, one snapshot
            copy.execute("PRAGMA journal_mode=DELETE")
            check = copy.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise BackupError(f"the copy failed its check: {check[0] if check else 'no answer'}")
        finally:
            copy.close()
    finally:
        source.close()
    os.replace(partial, target)
    return BackupResult(target, target.stat().st_size, "sqlite backup API")


def _run_client(program: str, arguments: list[str], url: URL) -> None:
    """Run a PostgreSQL client program on the database of ``url``; a failure raises BackupError."""
    executable = shutil.which(program)
    if executable is None:
        raise BackupError(f"{program} not found: install the PostgreSQL client programs (Debian: postgresql-client)")
    environment = dict(os.environ)
    if url.password is not None:
        environment["PGPASSWORD"] = str(url.password)
    plain = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    result = subprocess.run([executable, "--dbname", plain, *arguments], env=environment, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise BackupError(f"{program} failed: {last}")
