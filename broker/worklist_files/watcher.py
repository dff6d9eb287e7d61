"""Following worklist folders in ``broker run``: the file system's events (``watchdog``: inotify on
Linux) for speed, a full scan every ``worklist_scan_interval`` as the safety net (events lost in an
overflow, a network file system without events, changes made while the broker was down).

One thread reads the files, one at a time, in the order their events arrived. A file renamed into
place is read at once; a file created or written in place is read once no event has touched it for
the settle time (and the scan reads only files whose time is older than that). In a cluster only the
node holding the lease ``worklist-folders`` reads: the others note nothing and take over (with a full
scan) when the holder stops or its lease expires.

A folder is never created by the watcher: a folder that is missing (a share not mounted yet) is
looked for at every scan and watched once it is there (again after it was unmounted and mounted).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from broker.cluster import leases
from broker.cluster.nodes import node_id_for
from broker.config import Settings
from broker.worklist_files.folders import Folder, is_worklist_name
from broker.worklist_files.intake import FileIntake

log = structlog.get_logger(__name__)
LEASE = "worklist-folders"
TICK = 0.02  # seconds between looks at the files waiting to settle


class _Events(FileSystemEventHandler):
    """Collects the paths the events name: (folder, path) -> (moment of the last event, renamed into place)."""

    def __init__(self, watcher: FolderWatcher, folder: Folder) -> None:
        self.watcher = watcher
        self.folder = folder

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        if event.event_type == "moved":
            self._note(str(event.src_path), renamed=False)
            self._note(str(event.dest_path), renamed=True)
        else:
            self._note(str(event.src_path), renamed=False)

    def _note(self, full: str, *, renamed: bool) -> None:
        try:
            relative = Path(full).relative_to(self.folder.root)
        except ValueError:
            return
        if any(part.startswith(".") for part in relative.parts) or not is_worklist_name(relative.name):
            return
        self.watcher.note(self.folder, relative.as_posix(), renamed=renamed)


class FolderWatcher:
    """Watches ``folders`` and applies their files through ``intake`` while holding the lease."""

    def __init__(self, engine: Engine, folders: list[Path], intake: FileIntake, *, holder: str,
                 settle_seconds: float = 2.0, scan_interval: float = 60.0, lease_seconds: float = 30.0,
                 delete_guard: float = 1.0) -> None:
        self.engine = engine
        self.folders = [Folder(root, intake, settle_seconds, delete_guard=delete_guard) for root in folders]
        self.holder = holder
        self.settle_seconds = settle_seconds
        self.scan_interval = scan_interval
        self.lease_seconds = lease_seconds
        self.active = False  # holds the lease
        self.scans = 0
        self._pending: dict[tuple[int, str], tuple[float, bool]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._watches: dict[int, tuple[tuple[int, int], Any]] = {}  # folder -> (root's device and inode, watch)

    def start(self) -> None:
        """Start the events and the reading thread (the first full scan runs once the lease is held)."""
        self._observer = Observer()
        self._observer.start()
        self._follow()
        self._thread = threading.Thread(target=self._loop, name="worklist-folders", daemon=True)
        self._thread.start()
        log.info("worklist_folders.watching", folders=[f.key for f in self.folders])

    def _follow(self) -> None:
        """Have the file system's events of every folder that is there (a folder missing, or unmounted
        and mounted again, is a new root: the old watch saw its last event)."""
        for index, folder in enumerate(self.folders):
            try:
                root = folder.root.stat()
                identity = (root.st_dev, root.st_ino)
            except OSError:
                identity = None
            watched = self._watches.get(index)
            if watched is not None and watched[0] == identity:
                continue
            if watched is not None:
                self._watches.pop(index)
                with contextlib.suppress(KeyError, OSError):  # already gone with its folder
                    self._observer.unschedule(watched[1])
            if identity is None:
                log.warning("worklist_folder.missing", folder=folder.key)
                continue
            try:
                watch = self._observer.schedule(_Events(self, folder), str(folder.root), recursive=True)
            except OSError as exc:
                log.warning("worklist_folder.not_watched", folder=folder.key, error=exc.strerror or str(exc))
                continue
            self._watches[index] = (identity, watch)


    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; the lease is released so another node takes over at once."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.active:
            try:
                leases.release(self.engine, LEASE, self.holder)
            except Exception:  # the database is gone: the lease expires by itself
                log.warning("worklist_folders.release_failed")
            self.active = False

    def note(self, folder: Folder, path: str, *, renamed: bool) -> None:
        """An event about ``path``: read it at once (renamed into place) or once it has settled."""
        key = (self.folders.index(folder), path)
        with self._lock:
            earlier = self._pending.get(key)
            self._pending[key] = (time.monotonic(), renamed or bool(earlier and earlier[1]))
        if renamed:
            self._wake.set()

    def _due(self) -> list[tuple[int, str]]:
        now = time.monotonic()
        with self._lock:
            due = [key for key, (at, renamed) in self._pending.items() if renamed or now - at >= self.settle_seconds]
            for key in due:
                del self._pending[key]
        return due

    def _hold_lease(self) -> bool:
        try:
            holding = leases.try_acquire(self.engine, LEASE, self.holder, self.lease_seconds)
        except Exception as exc:
            log.warning("worklist_folders.lease_failed", error=type(exc).__name__)
            holding = False
        if holding != self.active:
            log.info("worklist_folders.reading" if holding else "worklist_folders.standing_by", holder=self.holder)
        self.active = holding
        return holding

    def _loop(self) -> None:
        renew_every = self.lease_seconds / 3
        renewed = -renew_every
        scanned = -self.scan_interval
        while not self._stop.is_set():
            now = time.monotonic()
            if now - renewed >= renew_every:
                was_active = self.active
                self._hold_lease()
                renewed = now
                if self.active and not was_active:
                    scanned = -self.scan_interval  # just took over: look at everything now
            if not self.active:
                with self._lock:
                    self._pending.clear()
                self._stop.wait(min(1.0, renew_every))
                continue
            try:
                if now - scanned >= self.scan_interval:
                    scanned = now
                    self.scan()
                for index, path in self._due():
                    if self._stop.is_set():
                        break
                    self.folders[index].handle(path)
            except Exception:  # a database outage: the next scan catches up
                log.exception("worklist_folders.failed")
                scanned = time.monotonic() - self.scan_interval + min(5.0, self.scan_interval)
            self._wake.wait(TICK)
            self._wake.clear()

    def scan(self) -> None:
        """One full look at every folder (files settled by their time, deletions); a folder that came
        back (mounted again) is watched again."""
        if self._observer is not None:
            self._follow()
        for folder in self.folders:
            folder.sync()
        self.scans += 1


def watcher_from_settings(settings: Settings, engine: Engine) -> FolderWatcher:
    """The watcher of ``broker run``: the folders, settle time, scan interval and delete policy of the
    settings, this node as the lease's holder."""
    intake = FileIntake(engine, on_delete=settings.worklist_on_delete, audit=settings.audit_enabled,
                        ae_title=settings.ae_title)
    return FolderWatcher(engine, settings.worklist_folder_paths, intake, holder=node_id_for(settings),
                         settle_seconds=settings.worklist_settle_seconds,
                         scan_interval=settings.worklist_scan_interval,
                         lease_seconds=settings.cluster_lease_seconds,
                         delete_guard=settings.worklist_delete_guard)
