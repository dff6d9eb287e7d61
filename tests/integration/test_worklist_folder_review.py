"""What a hospital's file share does to a watched worklist folder (issue 23, review): the share
unmounted or emptied (nothing is cancelled), a sub-folder or file that cannot be read, a symbolic link
back up the tree, a huge file, a file replaced by rename with its old size and time, a file whose time
is ahead of the broker's clock, and a watcher started before its folder exists.

Each test runs on SQLite and PostgreSQL with the real intake (``Folder.sync`` is one scan of the
watcher); the watcher itself runs where its events matter.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from worklist_file_support import Item, wl_bytes, write_wl

from broker.store import migrate
from broker.store.tables import InboundMessage, ScheduledStep, WorklistFile, table_of
from broker.worklist_files.folders import DELETE_GUARD_MINIMUM, MAX_FILE_BYTES, PARSING_PROCESS_MINIMUM, Folder, listing
from broker.worklist_files.importer import import_folder
from broker.worklist_files.intake import FileIntake
from broker.worklist_files.watcher import FolderWatcher
from tests.dicom_support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Invalid value for VR")]

STEPS = table_of(ScheduledStep)
MESSAGES = table_of(InboundMessage)
FILES = table_of(WorklistFile)


@pytest.fixture
def migrated(engine: Engine) -> Engine:
    migrate.upgrade(engine)
    return engine


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as db:
        return {row.sps_id: row.sps_status for row in db.execute(select(STEPS))}


def count(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def fill(folder: Path, n: int, prefix: str = "U") -> None:
    for i in range(n):
        write_wl(folder / f"AE{i % 3}" / f"{i}.wl", Item(f"{prefix}{i}").dataset())


def scan(engine: Engine, folder: Path, **options: Any) -> list[str]:
    """One scan as the watcher makes it (settled files only), with a fresh Folder unless given."""
    return [o.outcome for o in Folder(folder, FileIntake(engine), settle_seconds=0, **options).sync()]


def test_an_unmounted_share_cancels_nothing(migrated: Engine, tmp_path: Path) -> None:
    """The folder disappears (its share unmounted, its mount point gone with it): no step is
    cancelled, nothing is archived; the files back, nothing changes either."""
    root = tmp_path / "share" / "worklists"
    fill(root, 12)
    watched = Folder(root, FileIntake(migrated), settle_seconds=0, delete_guard=0.5)
    assert [o.outcome for o in watched.sync()] == ["created"] * 12
    messages = count(migrated, MESSAGES)
    shutil.move(root, tmp_path / "elsewhere")
    assert watched.sync() == [] and watched.sync() == []
    assert set(statuses(migrated).values()) == {"SCHEDULED"} and count(migrated, MESSAGES) == messages
    shutil.move(tmp_path / "elsewhere", root)
    assert watched.sync() == [] and set(statuses(migrated).values()) == {"SCHEDULED"}


def test_an_emptied_folder_holds_its_deletions_until_the_guard_is_raised(migrated: Engine, tmp_path: Path) -> None:
    """An empty mount point in the folder's place (or a folder emptied by mistake): more than the guard's
    fraction of the files gone at once cancels none of them; a few files deleted are cancelled as ever;
    with the guard at 1 (the operator meant it) the rest are cancelled."""
    root = tmp_path / "worklists"
    fill(root, 3 * DELETE_GUARD_MINIMUM)
    assert scan(migrated, root, delete_guard=0.5).count("created") == 3 * DELETE_GUARD_MINIMUM
    for i in range(3):  # a few files deleted: their steps cancelled
        (root / f"AE{i % 3}" / f"{i}.wl").unlink()
    assert scan(migrated, root, delete_guard=0.5) == ["cancelled"] * 3
    for sub in root.iterdir():  # everything else vanishes at once
        shutil.rmtree(sub)
    assert scan(migrated, root, delete_guard=0.5) == []
    assert scan(migrated, root, delete_guard=0.5) == []  # held at every scan, not worn down
    assert list(statuses(migrated).values()).count("SCHEDULED") == 3 * DELETE_GUARD_MINIMUM - 3
    assert scan(migrated, root, delete_guard=1.0) == ["cancelled"] * (3 * DELETE_GUARD_MINIMUM - 3)
    assert set(statuses(migrated).values()) == {"CANCELED"}


def test_a_folder_on_another_file_system_than_before_holds_its_deletions(migrated: Engine, tmp_path: Path) -> None:
    """The share's mount point seen empty: the folder's device is not the one of its first listing,
    so the files are not gone, the share is (whatever the guard's fraction says)."""
    root = tmp_path / "worklists"
    fill(root, 2)
    watched = Folder(root, FileIntake(migrated), settle_seconds=0, delete_guard=1.0)
    assert [o.outcome for o in watched.sync()] == ["created"] * 2
    assert watched.device == root.stat().st_dev
    watched.device = root.stat().st_dev + 1  # as if the first listing had been on the share
    for sub in root.iterdir():
        shutil.rmtree(sub)
    assert watched.sync() == [] and set(statuses(migrated).values()) == {"SCHEDULED"}
    assert not watched.available()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads whatever the permissions say")
def test_a_sub_folder_without_permission_cancels_nothing_and_the_rest_is_read(
        migrated: Engine, tmp_path: Path) -> None:
    root = tmp_path / "worklists"
    fill(root, 6)
    assert scan(migrated, root) == ["created"] * 6
    write_wl(root / "AE9" / "new.wl", Item("U9").dataset())
    (root / "AE0").chmod(0)
    (root / "AE1" / "1.wl").chmod(0)
    try:
        assert scan(migrated, root) == ["created"]
        assert set(statuses(migrated).values()) == {"SCHEDULED"}
    finally:
        (root / "AE0").chmod(0o755)
        (root / "AE1" / "1.wl").chmod(0o644)


def test_a_file_that_cannot_be_read_is_skipped_and_read_again_later(migrated: Engine, tmp_path: Path) -> None:
    """An I/O error on one file (here: a link to a file whose reading fails with EIO) skips that
    file, reported, not archived, not moved, and the other files of the batch are applied."""
    root = tmp_path / "worklists"
    fill(root, 2)
    (root / "AE0" / "io-error.wl").symlink_to("/proc/self/mem")
    summary = import_folder(FileIntake(migrated), root)
    assert summary.counts["created"] == 2 and [path for path, _ in summary.skipped] == ["AE0/io-error.wl"]
    assert summary.skipped[0][1].startswith("cannot be read")
    assert count(migrated, MESSAGES) == 2 and (root / "AE0" / "io-error.wl").is_symlink()
    again = import_folder(FileIntake(migrated), root)
    assert [path for path, _ in again.skipped] == ["AE0/io-error.wl"] and again.counts["unchanged"] == 2


def test_a_link_back_up_the_tree_is_listed_once(tmp_path: Path) -> None:
    write_wl(tmp_path / "CT01" / "a.wl", Item("A").dataset())
    (tmp_path / "CT01" / "up").symlink_to("..")
    (tmp_path / "alias").symlink_to("CT01")
    found = listing(tmp_path)
    assert list(found.files) == ["CT01/a.wl"]
    assert not found.unlisted


def test_a_huge_file_is_refused_without_being_read(migrated: Engine, tmp_path: Path) -> None:
    root = tmp_path / "worklists"
    (root / "CT01").mkdir(parents=True)
    with (root / "CT01" / "huge.wl").open("wb") as out:
        out.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk, but a file too large to be one item
    summary = import_folder(FileIntake(migrated), root)
    assert summary.refused == [("CT01/huge.wl", f"{MAX_FILE_BYTES + 1} bytes: larger than 16 MB")]
    with migrated.connect() as db:
        archived = db.execute(select(MESSAGES)).one()
    assert (archived.status, bytes(archived.raw)) == ("error", b"")
    assert (root / "CT01" / "huge.wl").exists()  # stays: refused, not unreadable
    assert import_folder(FileIntake(migrated), root).counts["unchanged"] == 1  # not read again


def test_a_file_replaced_by_rename_with_the_same_size_and_time_is_read(migrated: Engine, tmp_path: Path) -> None:
    """``cp -p`` / ``rsync`` of a new version over the old one: same size, same modification time,
    different bytes; the status change time of the renamed file tells."""
    root = tmp_path / "worklists"
    path = write_wl(root / "CT01" / "r.wl", Item("R1", time="090000").dataset())
    assert scan(migrated, root) == ["created"]
    old = path.stat()
    newer = root / "CT01" / ".r.wl.tmp"
    newer.write_bytes(wl_bytes(Item("R1", time="100000").dataset()))
    assert newer.stat().st_size == old.st_size
    os.utime(newer, ns=(old.st_atime_ns, old.st_mtime_ns))
    time.sleep(0.01)
    os.replace(newer, path)
    assert scan(migrated, root) == ["updated"]
    with migrated.connect() as db:
        assert db.execute(select(STEPS.c.sps_start_time)).scalar_one() == "100000"


def test_a_file_whose_time_is_ahead_of_the_clock_is_read_at_the_next_scan(migrated: Engine, tmp_path: Path) -> None:
    """The file server's clock an hour ahead: the file is not 'still being written' for an hour; the
    scan that sees it unchanged a second time reads it."""
    root = tmp_path / "worklists"
    path = write_wl(root / "skew.wl", Item("K1").dataset())
    ahead = time.time_ns() + 3600 * 10**9
    os.utime(path, ns=(ahead, ahead))
    watched = Folder(root, FileIntake(migrated), settle_seconds=2)
    assert watched.sync() == []  # just seen, looks freshly written
    assert [o.outcome for o in watched.sync()] == ["created"]


def test_the_watcher_does_not_make_a_missing_folder_and_watches_it_once_it_is_there(
        migrated: Engine, tmp_path: Path) -> None:
    """A share not mounted yet when ``broker run`` starts: no local folder is made in its place (an
    empty one would later look like every file deleted); once mounted, its files are read and its
    events followed."""
    root = tmp_path / "share"
    watcher = FolderWatcher(migrated, [root], FileIntake(migrated), holder="node-a", settle_seconds=0.2,
                            scan_interval=0.3, lease_seconds=3)
    watcher.start()
    try:
        wait_until(lambda: watcher.scans >= 2, what="two scans")
        assert not root.exists()
        mounted = tmp_path / "mounted"
        write_wl(mounted / "CT01" / "m.wl", Item("M1").dataset())
        mounted.rename(root)
        wait_until(lambda: statuses(migrated).get("M1") == "SCHEDULED", what="the file read")
        watcher.scan_interval = 3600  # from now on only the events
        write_wl(root / "CT01" / "n.wl", Item("M2").dataset())
        wait_until(lambda: statuses(migrated).get("M2") == "SCHEDULED", what="the event followed")
    finally:
        watcher.stop()


def test_a_large_import_parses_in_a_parsing_process_with_the_same_outcomes(migrated: Engine, tmp_path: Path) -> None:
    """From PARSING_PROCESS_MINIMUM files on, files are parsed in a parsing process while the previous
    batch is written: every file still gets its step, a refused and an unreadable one are refused as
    ever (the unreadable one moved aside), and a second import reads nothing."""
    root = tmp_path / "export"
    fill(root, PARSING_PROCESS_MINIMUM + 10, prefix="L")
    no_patient = Item("LX").dataset()
    no_patient.PatientID = ""
    write_wl(root / "AE1" / "nopatient.wl", no_patient)
    write_wl(root / "AE2" / "junk.wl", b"\x00" * 10)
    summary = import_folder(FileIntake(migrated), root)
    assert summary.counts["created"] == PARSING_PROCESS_MINIMUM + 10 and summary.moved_aside == 1
    assert sorted(path for path, _ in summary.refused) == ["AE1/nopatient.wl", "AE2/junk.wl"]
    assert len(statuses(migrated)) == PARSING_PROCESS_MINIMUM + 10
    assert count(migrated, MESSAGES) == PARSING_PROCESS_MINIMUM + 12
    assert (root / ".failed" / "AE2" / "junk.wl").exists()
    again = import_folder(FileIntake(migrated), root)
    assert again.counts["unchanged"] == PARSING_PROCESS_MINIMUM + 11 and not again.refused


def test_two_folders_with_the_same_file_name_are_two_steps(migrated: Engine, tmp_path: Path) -> None:
    """Files without Study Instance UID and SPS ID are known by their path: the same name in two
    watched folders (two sites' exports) is two patients' steps, not one step flipping between them."""
    for site, patient in (("site-a", "PA"), ("site-b", "PB")):
        ds = Item("", patient_id=patient).dataset()
        del ds.StudyInstanceUID
        write_wl(tmp_path / site / "0001.wl", ds)
        assert scan(migrated, tmp_path / site) == ["created"]
    with migrated.connect() as db:
        rows = db.execute(select(STEPS.c.patient_id, STEPS.c.study_instance_uid)).all()
    assert sorted(r.patient_id for r in rows) == ["PA", "PB"]
    assert rows[0].study_instance_uid != rows[1].study_instance_uid
