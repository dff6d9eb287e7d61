"""One worklist folder: which ``.wl`` files it holds, which of them changed since they were read, and
reading a file only once it is complete.

A folder holds ``*.wl`` files (any case), directly or in sub-folders (wlmscpfs keeps one per AE
title); names starting with a dot are skipped at every level, so a writer may write ``.name.wl.tmp``
and rename it, and the folder for unreadable files (``.failed``) is not scanned. A file is complete
when it was renamed into place (the watcher's event says so) or has been unchanged for the settle
time; its bytes are taken only if its size and time are the same after reading as before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from broker.worklist_files.intake import FileIntake, FileStat, Outcome, Read

log = structlog.get_logger(__name__)
FAILED_DIR = ".failed"
SUFFIX = ".wl"
BATCH = 200  # files per transaction in a scan or an import


def is_worklist_name(name: str) -> bool:
    """A ``.wl`` file's name that is not hidden (nor a temporary file being written)."""
    return not name.startswith(".") and name.lower().endswith(SUFFIX)


def list_files(root: Path) -> dict[str, FileStat]:
    """The ``.wl`` files under ``root`` by path relative to it (``/`` separated), with size and time."""
    found: dict[str, FileStat] = {}

    def walk(directory: str, prefix: str) -> None:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    walk(entry.path, f"{prefix}{entry.name}/")
                elif is_worklist_name(entry.name) and entry.is_file(follow_symlinks=True):
                    stat = entry.stat(follow_symlinks=True)
                    found[prefix + entry.name] = FileStat(stat.st_size, stat.st_mtime_ns)
            except FileNotFoundError:  # gone while listed: the next look sees it gone
                continue

    walk(str(root), "")
    return found


@dataclass(frozen=True)
class Change:
    """A file to read (``stat`` set) or one that is gone (``stat`` None)."""

    path: str
    stat: FileStat | None


class Folder:
    """A watched folder and its files' state; ``key`` names it in ``worklist_files``."""

    def __init__(self, root: Path, intake: FileIntake, settle_seconds: float = 2.0) -> None:
        self.root = root.resolve()
        self.key = str(self.root)
        self.intake = intake
        self.settle_ns = int(settle_seconds * 1e9)

    def changes(self, *, settled_only: bool = True, deletions: bool = True) -> Iterator[Change]:
        """The files new or changed since they were read (those still being written, by their time,
        left for a later look when ``settled_only``), then those gone."""
        known = self.intake.known(self.key)
        files = list_files(self.root)
        now_ns = time.time_ns()
        for path in sorted(files):
            stat = files[path]
            state = known.get(path)
            if state is not None and state.present and (state.size, state.mtime_ns) == (stat.size, stat.mtime_ns):
                continue
            if settled_only and now_ns - stat.mtime_ns < self.settle_ns:
                continue
            yield Change(path, stat)
        if deletions:
            for path, state in known.items():
                if state.present and path not in files:
                    yield Change(path, None)

    def sync(self, *, settled_only: bool = True, dry_run: bool = False, batch: int = BATCH,
             progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Read every changed file (``batch`` files per transaction) and handle every deleted one;
        returns what became of each."""
        outcomes: list[Outcome] = []
        written: list[str] = []

        def flush() -> None:
            for outcome in self.handle_many(written, dry_run=dry_run):
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
            written.clear()

        for change in self.changes(settled_only=settled_only):
            if change.stat is not None:
                written.append(change.path)
                if len(written) >= batch:
                    flush()
                continue
            outcome = self.intake.remove(self.key, change.path, dry_run=dry_run)
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
        flush()
        return outcomes

    def handle(self, path: str, *, dry_run: bool = False) -> Outcome | None:
        """Read one file (present: applied; gone: removed). None: it changed while it was read (it is
        still being written; a later event or scan reads it)."""
        outcomes = self.handle_many([path], dry_run=dry_run)
        return outcomes[0] if outcomes else None

    def handle_many(self, paths: list[str], *, dry_run: bool = False) -> list[Outcome]:
        """Read files and apply those read complete in one batch; a file gone is removed. Files that
        changed while they were read are left out (a later event or scan reads them)."""
        reads: list[Read] = []
        outcomes: list[Outcome] = []
        for path in paths:
            full = self.root / path
            try:
                before = full.stat()
                data = full.read_bytes()
                after = full.stat()
            except FileNotFoundError:
                outcomes.append(self.intake.remove(self.key, path, dry_run=dry_run))
                continue
            stat = FileStat(after.st_size, after.st_mtime_ns)
            if (before.st_size, before.st_mtime_ns) == (stat.size, stat.mtime_ns) and len(data) == stat.size:
                reads.append(Read(path, data, stat))
        if reads:
            for outcome in self.intake.apply_many(self.key, reads, dry_run=dry_run):
                if outcome.outcome == "unreadable" and not dry_run:
                    self.move_aside(outcome.path)
                outcomes.append(outcome)
        return outcomes

    def move_aside(self, path: str) -> Path | None:
        """Move an unreadable file into ``.failed/`` (same sub-path; an older one there is kept under a
        numbered name), so it is neither lost nor read again; its state row is marked gone."""
        source = self.root / path
        target = self.root / FAILED_DIR / path
        target.parent.mkdir(parents=True, exist_ok=True)
        number = 1
        while target.exists():
            target = target.with_name(f"{Path(path).name}.{number}")
            number += 1
        try:
            os.replace(source, target)
        except FileNotFoundError:
            return None
        self.intake.forget(self.key, path)
        log.warning("worklist_file.moved_aside", folder=self.key, path=path, to=str(target.relative_to(self.root)))
        return target
