"""``broker import-worklist DIR``: load a folder of ``.wl`` files once (a migration from wlmscpfs or
Orthanc), with a summary of what was read, created, updated and refused (with the reasons).

Import and watcher share the file state (``worklist_files``): a folder imported once and then watched
by ``broker run`` is not read again, and importing it twice changes nothing the second time. Deleted
files are not the import's business (the watcher cancels their steps).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker.worklist_files.folders import BATCH, Folder, listing
from broker.worklist_files.intake import FileIntake, Outcome


@dataclass
class Summary:
    """What an import did (or, dry run, would do)."""

    read: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # could not be read (permissions, I/O)
    moved_aside: int = 0

    def add(self, outcome: Outcome) -> None:
        if outcome.outcome == "skipped":  # not read: not archived, read again by the next import or scan
            self.skipped.append((outcome.path, outcome.error))
            return
        self.read += 1
        self.counts[outcome.outcome] += 1
        if outcome.failed:
            self.refused.append((outcome.path, outcome.error))

    def lines(self, *, dry_run: bool = False, limit: int = 50) -> list[str]:
        """The summary for the console: counts, then the refused files with their reasons."""
        would = "would be " if dry_run else ""
        lines = [f"items read: {self.read}",
                 f"{would}created: {self.counts['created']}",
                 f"{would}updated: {self.counts['updated']}",
                 f"unchanged: {self.counts['unchanged']}",
                 f"{would}refused: {len(self.refused)}"]
        for path, reason in self.refused[:limit]:
            lines.append(f"  {path}: {reason}")
        if len(self.refused) > limit:
            lines.append(f"  ... and {len(self.refused) - limit} more (listed in GET /api/messages?status=error)")
        if self.moved_aside:
            lines.append(f"unreadable files moved to .failed/: {self.moved_aside}")
        if self.skipped:
            lines.append(f"not read (permissions, I/O errors; read again next time): {len(self.skipped)}")
            lines.extend(f"  {path}: {reason}" for path, reason in self.skipped[:limit])
        return lines


def import_folder(intake: FileIntake, root: Path, *, dry_run: bool = False,
                  total: Callable[[int], None] | None = None,
                  progress: Callable[[Outcome], None] | None = None) -> Summary:
    """Read every new or changed ``.wl`` file of ``root`` (whatever its age: nobody writes during a
    migration) and apply it; ``dry_run`` reads and reports without changing the database or the folder.
    ``total`` is told how many files will be read, ``progress`` each one's outcome."""
    summary = Summary()
    folder = Folder(root, intake, settle_seconds=0)
    listed = len(listing(folder.root).files)
    changes = list(folder.changes(settled_only=False, deletions=False))
    summary.counts["unchanged"] += listed - len(changes)  # read before, same size and time: not opened
    summary.read += listed - len(changes)
    if total is not None:
        total(len(changes))
    paths = [change.path for change in changes]
    # (a file written to while it was read is left out: the watcher reads it later)
    batches = [paths[start:start + BATCH] for start in range(0, len(paths), BATCH)]
    for outcome in folder.apply_batches(batches, dry_run=dry_run):
        summary.add(outcome)
        if outcome.outcome == "unreadable" and not dry_run:
            summary.moved_aside += 1
        if progress is not None:
            progress(outcome)
    return summary
