"""One worklist folder: which ``.wl`` files it holds, which of them changed since they were read, and
reading a file only once it is complete.

A folder holds ``*.wl`` files (any case), directly or in sub-folders (wlmscpfs keeps one per AE
title); names starting with a dot are skipped at every level, so a writer may write ``.name.wl.tmp``
and rename it, and the folder for unreadable files (``.failed``) is not scanned. A file is complete
when it was renamed into place (the watcher's event says so) or has been unchanged for the settle
time (by its time, or, for a file whose time is ahead of the broker's clock, seen unchanged by two
scans); its bytes are taken only if its size and time are the same after reading as before.

A file's time is the later of its modification and status change times: a file replaced by rename
with the old file's size and modification time (``cp -p``, ``rsync``) still has a new status change
time, which no program can set back.

Deletions are trusted only from a folder that is really there: a folder that is missing or cannot be
listed (a network share unmounted, permissions) cancels nothing, nor do the files of a sub-folder that
cannot be listed; a folder that moved to another file system since the last scan (an unmounted
share's empty mount point) and a scan that finds more than ``delete_guard`` of the folder's files gone
at once hold their deletions with a warning instead of cancelling the steps.
"""

from __future__ import annotations

import multiprocessing
import os
import stat as stat_module
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from broker.worklist_files.intake import FileIntake, FileStat, Outcome, Read
from broker.worklist_files.reading import Parsed, parse_many

log = structlog.get_logger(__name__)
FAILED_DIR = ".failed"
SUFFIX = ".wl"
BATCH = 200  # files per transaction in a scan or an import
MAX_FILE_BYTES = 16 << 20
"""A larger file is refused without being read (a worklist item is a few KB; a huge file in the folder
is a mistake, and reading it whole could exhaust the broker's memory)."""
PARSING_PROCESS_MINIMUM = 2 * BATCH
"""A scan or import of this many files or more parses them in a parsing process (below it, starting
that process costs more than it saves)."""
DELETE_GUARD_MINIMUM = 10
"""Fewer files gone at once than this are always deleted (the fraction guard is for mass vanishing)."""


class FolderUnavailable(OSError):
    """The folder's root cannot be listed (missing, not a folder, no permission, I/O error)."""


def is_worklist_name(name: str) -> bool:
    """A ``.wl`` file's name that is not hidden (nor a temporary file being written)."""
    return not name.startswith(".") and name.lower().endswith(SUFFIX)


def file_stat(result: os.stat_result) -> FileStat:
    """Size and time of a file; the time is the later of modification and status change (see above)."""
    return FileStat(result.st_size, max(result.st_mtime_ns, result.st_ctime_ns))


@dataclass
class Listing:
    """The ``.wl`` files under a root (path relative to it, ``/`` separated) with size and time;
    ``unlisted``: sub-folders (``CT01/``) that could not be listed, whose files are not known to be gone;
    ``device``: the file system the root is on."""

    files: dict[str, FileStat] = field(default_factory=dict)
    unlisted: list[str] = field(default_factory=list)
    device: int = 0

    def hides(self, path: str) -> bool:
        """Whether ``path`` lies in a sub-folder that could not be listed."""
        return any(path.startswith(prefix) for prefix in self.unlisted)


def listing(root: Path) -> Listing:
    """List ``root`` (following symbolic links, each folder once: a link back up is no endless loop);
    raises FolderUnavailable when the root itself cannot be listed."""
    try:
        root_stat = os.stat(root)
        if not stat_module.S_ISDIR(root_stat.st_mode):
            raise FolderUnavailable(f"not a folder: {root}")
        entries = list(os.scandir(root))
    except FolderUnavailable:
        raise
    except OSError as exc:
        raise FolderUnavailable(f"{exc.strerror or type(exc).__name__}: {root}") from exc
    result = Listing(device=root_stat.st_dev)
    seen = {(root_stat.st_dev, root_stat.st_ino)}

    def walk(entries: list[os.DirEntry[str]], prefix: str) -> None:
        for entry in sorted(entries, key=lambda e: (e.is_symlink(), e.name)):  # a folder by its own name first
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    folder = entry.stat(follow_symlinks=True)
                    if (folder.st_dev, folder.st_ino) in seen:
                        continue  # a link to a folder already listed
                    seen.add((folder.st_dev, folder.st_ino))
                    try:
                        inner = list(os.scandir(entry.path))
                    except FileNotFoundError:
                        continue  # gone meanwhile: the next look sees it gone
                    except OSError as exc:
                        log.warning("worklist_folder.subfolder_unreadable", folder=str(root),
                                    path=prefix + entry.name, error=exc.strerror or type(exc).__name__)
                        result.unlisted.append(f"{prefix}{entry.name}/")
                        continue
                    walk(inner, f"{prefix}{entry.name}/")
                elif is_worklist_name(entry.name) and entry.is_file(follow_symlinks=True):
                    result.files[prefix + entry.name] = file_stat(entry.stat(follow_symlinks=True))
            except FileNotFoundError:  # gone while listed (or a dangling link): the next look sees it gone
                continue
            except OSError as exc:  # a file or folder that cannot be looked at is not known to be gone
                log.warning("worklist_folder.entry_unreadable", folder=str(root), path=prefix + entry.name,
                            error=exc.strerror or type(exc).__name__)
                result.unlisted.append(prefix + entry.name)

    walk(entries, "")
    return result


def list_files(root: Path) -> dict[str, FileStat]:
    """The ``.wl`` files under ``root`` by path relative to it; none when the root cannot be listed."""
    try:
        return listing(root).files
    except FolderUnavailable:
        return {}


@dataclass(frozen=True)
class Change:
    """A file to read (``stat`` set) or one that is gone (``stat`` None)."""

    path: str
    stat: FileStat | None


class Folder:
    """A watched folder and its files' state; ``key`` names it in ``worklist_files``. ``delete_guard``:
    the fraction of its files that may vanish in one scan before their deletions are held (1: no
    guard)."""

    def __init__(self, root: Path, intake: FileIntake, settle_seconds: float = 2.0, *,
                 delete_guard: float = 1.0) -> None:
        self.root = root.resolve()
        self.key = str(self.root)
        self.intake = intake
        self.settle_ns = int(settle_seconds * 1e9)
        self.delete_guard = delete_guard
        self.device: int | None = None  # the file system of the root at its first listing
        self._unsettled: dict[str, FileStat] = {}  # files left for a later look, as last seen

    def available(self) -> bool:
        """Whether the root is there, a folder, on the file system it was on at the first listing."""
        try:
            root = os.stat(self.root)
        except OSError:
            return False
        return stat_module.S_ISDIR(root.st_mode) and self.device in (None, root.st_dev)

    def changes(self, *, settled_only: bool = True, deletions: bool = True) -> Iterator[Change]:
        """The files new or changed since they were read (those still being written, by their time,
        left for a later look when ``settled_only``), then those gone. Raises FolderUnavailable when
        the root cannot be listed (nothing is then deleted)."""
        known = self.intake.known(self.key)
        found = listing(self.root)
        files = found.files
        now_ns = time.time_ns()
        unsettled: dict[str, FileStat] = {}
        for path in sorted(files):
            stat = files[path]
            state = known.get(path)
            if state is not None and state.present and (state.size, state.mtime_ns) == (stat.size, stat.mtime_ns):
                continue
            if settled_only and now_ns - stat.mtime_ns < self.settle_ns and self._unsettled.get(path) != stat:
                unsettled[path] = stat  # (a time ahead of the clock: unchanged at the next scan is settled)
                continue
            yield Change(path, stat)
        self._unsettled = unsettled
        if self.device is None:
            self.device = found.device
        if not deletions:
            return
        gone = [path for path, state in known.items()
                if state.present and path not in files and not found.hides(path)]
        if gone and not self._deletions_trusted(found, gone, sum(1 for s in known.values() if s.present)):
            return
        for path in gone:
            yield Change(path, None)

    def _deletions_trusted(self, found: Listing, gone: list[str], present: int) -> bool:
        """False (with a warning, each scan, until someone acts) when the files seem gone because the
        folder is not the one they were in: another file system (an unmounted share's mount point) or
        more than ``delete_guard`` of them vanished at once."""
        if found.device != self.device:
            log.warning("worklist_folder.deletions_held", folder=self.key, files=len(gone),
                        reason="the folder is on another file system than before (a share unmounted?)")
            return False
        if len(gone) >= DELETE_GUARD_MINIMUM and len(gone) > self.delete_guard * present:
            log.warning("worklist_folder.deletions_held", folder=self.key, files=len(gone), of=present,
                        reason="more files vanished at once than worklist_delete_guard allows (a share "
                               "unmounted or emptied?); their steps stay until the files return or the "
                               "guard is raised")
            return False
        return True

    def sync(self, *, settled_only: bool = True, dry_run: bool = False, batch: int = BATCH,
             progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Read every changed file (``batch`` files per transaction) and handle every deleted one;
        returns what became of each."""
        try:
            changes = list(self.changes(settled_only=settled_only))
        except FolderUnavailable as exc:
            log.warning("worklist_folder.unavailable", folder=self.key, error=str(exc),
                        note="nothing is read or cancelled until the folder is back")
            return []
        outcomes: list[Outcome] = []
        written = [change.path for change in changes if change.stat is not None]
        batches = [written[start:start + batch] for start in range(0, len(written), batch)]
        for outcome in self.apply_batches(batches, dry_run=dry_run):
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
        for change in changes:
            if change.stat is None:
                outcome = self.intake.remove(self.key, change.path, dry_run=dry_run)
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
        return outcomes

    def apply_batches(self, batches: list[list[str]], *, dry_run: bool = False) -> Iterator[Outcome]:
        """:meth:`handle_many` of each batch; from :data:`PARSING_PROCESS_MINIMUM` files on, the files
        of the next batch are parsed in a parsing process while this one writes the current batch to
        the database (parsing is about half the broker's CPU per file)."""
        if sum(map(len, batches)) < PARSING_PROCESS_MINIMUM:
            for paths in batches:
                yield from self.handle_many(paths, dry_run=dry_run)
            return
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending: tuple[list[Read], list[Outcome], Future[list[Parsed]] | None] | None = None
            for paths in batches:
                reads, outcomes = self._read(paths, dry_run=dry_run)
                future: Future[list[Parsed]] | None = None
                try:
                    future = pool.submit(parse_many, self.key, [(r.path, r.data) for r in reads if not r.refusal])
                except RuntimeError:  # the parsing process is broken (BrokenProcessPool): parse here
                    log.warning("worklist_folder.parsing_process_failed", folder=self.key)
                if pending is not None:
                    yield from self._apply(*pending, dry_run=dry_run)
                pending = (reads, outcomes, future)
            if pending is not None:
                yield from self._apply(*pending, dry_run=dry_run)

    def handle(self, path: str, *, dry_run: bool = False) -> Outcome | None:
        """Read one file (present: applied; gone: removed). None: it changed while it was read (it is
        still being written; a later event or scan reads it)."""
        outcomes = self.handle_many([path], dry_run=dry_run)
        return outcomes[0] if outcomes else None

    def handle_many(self, paths: list[str], *, dry_run: bool = False) -> list[Outcome]:
        """Read files and apply those read complete in one batch; a file gone is removed (only while
        the folder is available: a file missing because its folder is gone cancels nothing). Files that
        changed while they were read are left out (a later event or scan reads them), so are files that
        cannot be read (permissions, I/O errors: outcome ``skipped``, read again at the next scan)."""
        reads, outcomes = self._read(paths, dry_run=dry_run)
        return list(self._apply(reads, outcomes, None, dry_run=dry_run))

    def _read(self, paths: list[str], *, dry_run: bool) -> tuple[list[Read], list[Outcome]]:
        """The files' bytes, each read complete; the outcomes of those gone or that cannot be read."""
        reads: list[Read] = []
        outcomes: list[Outcome] = []
        for path in paths:
            full = self.root / path
            try:
                before = full.stat()
                if before.st_size > MAX_FILE_BYTES:
                    reads.append(Read(path, b"", file_stat(before),
                                      refusal=f"{before.st_size} bytes: larger than {MAX_FILE_BYTES >> 20} MB"))
                    continue
                data = full.read_bytes()
                after = full.stat()
            except FileNotFoundError:
                if self.available():
                    outcomes.append(self.intake.remove(self.key, path, dry_run=dry_run))
                continue
            except OSError as exc:
                reason = f"cannot be read: {exc.strerror or type(exc).__name__}"
                log.warning("worklist_file.skipped", folder=self.key, path=path, reason=reason)
                outcomes.append(Outcome(path, "skipped", "", reason))
                continue
            stat = file_stat(after)
            if file_stat(before) == stat and len(data) == stat.size:
                reads.append(Read(path, data, stat))
        return reads, outcomes

    def _apply(self, reads: list[Read], outcomes: list[Outcome], parsing: Future[list[Parsed]] | None, *,
               dry_run: bool) -> Iterator[Outcome]:
        """Apply files read (parsed by ``parsing``, if given, for those not refused unread); unreadable
        ones are moved aside."""
        yield from outcomes
        if not reads:
            return
        parsed: list[Parsed] | None = None
        if parsing is not None:
            try:
                done = iter(parsing.result())
                parsed = [(None, r.refusal, False) if r.refusal else next(done) for r in reads]
            except Exception:  # the parsing process died: parse here
                log.warning("worklist_folder.parsing_process_failed", folder=self.key, exc_info=True)
        for outcome in self.intake.apply_many(self.key, reads, dry_run=dry_run, parsed=parsed):
            if outcome.outcome == "unreadable" and not dry_run:
                self.move_aside(outcome.path)
            yield outcome

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
