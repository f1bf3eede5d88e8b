"""The bitmap method (`method: bitmap`, issue 15) against real libvirtd + QEMU + borg + restic.

The README's promises, one test each: every archive restores to exactly the guest view at its
instant; an incremental run reads only the segments that changed (bytes read <= their bytes + 1 %),
and what the repository itself records as changed agrees; older archives may be deleted in any order;
a repository that missed runs gets a complete archive next time; `--full` re-reads everything.

The domains have no OS (KVM, seconds per run); every guest write goes through HMP qemu-io AND into
a raw reference model (tests/harness/bitmap.py), so the reference of a backup is the model copied
at its instant. 64 MiB disks, 256 KiB segments: 256 segments per disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import DiskSpec, image_virtual_size, qemu_img_compare, start_cli, wait_for
from harness.bitmap import (
    KiB,
    MiB,
    SEGMENT_SIZE,
    DiskModel,
    archive_of,
    assert_restores_to,
    backup,
    bitmap_settings,
    borg_changed_paths,
    disk_stats,
    leftovers,
    list_archives,
    repository_check,
    restic_changed_paths,
    restic_snapshot_id,
    segment_count,
    segment_files,
    short_scratch_dir,
)
from harness.cli import RESTIC_BIN, restic_env, run_borg
from support import write_config, write_passphrase

DISK = 64 * MiB
SEGMENTS = segment_count(DISK)
SPARSE_DISK = [DiskSpec("vda", "qcow2", 64, fill="sparse")]  # even MiBs hold a pattern, odd MiBs are holes


@pytest.fixture
def scratch(run_dir):
    """A short scratch_dir (the NBD socket path must fit in 107 bytes), removed after the test."""
    directory = short_scratch_dir(run_dir)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def repository(kind: str, directory: Path, name: str | None = None) -> dict:
    """A config entry for a fresh local `kind` (borg|restic) repository below `directory`."""
    name = name or kind
    directory.mkdir(parents=True, exist_ok=True)
    secret = str(write_passphrase(directory / f"{name}.pass"))
    if kind == "borg":
        return {"name": name, "type": "borg", "path": str(directory / f"{name}-repo"), "passphrase_file": secret}
    return {"name": name, "type": "restic", "url": str(directory / f"{name}-repo"), "passphrase_file": secret}


def location(repo: dict) -> str:
    return repo.get("path") or repo["url"]


def changed_segments(repo: dict, older: str, newer: str, target: str = "vda") -> set[int]:
    """The segments of `target` whose content the repository itself records as changed between two archives."""
    if repo["type"] == "borg":
        return segment_files(borg_changed_paths(Path(repo["path"]), older, newer), target)
    return segment_files(restic_changed_paths(repo["url"], older, newer), target)


def nonzero(reference: Path, segments: set[int]) -> set[int]:
    """The segments among `segments` that hold a non-zero byte in the raw `reference`."""
    out = set()
    with open(reference, "rb") as handle:
        for index in segments:
            handle.seek(index * SEGMENT_SIZE)
            if handle.read(SEGMENT_SIZE).strip(b"\0"):
                out.add(index)
    return out


def assert_read_only_dirty(stats: dict, dirty: set[int], reference: Path) -> None:
    """An incremental run of one disk into one repository: its dirty segments are exactly the written ones,
    and it read at least their data and at most their bytes + 1 %."""
    assert stats["full_read_reason"] is None, stats
    assert stats["segments_total"] == SEGMENTS, stats
    assert stats["segments_dirty"] == len(dirty), (stats, sorted(dirty))
    assert len(nonzero(reference, dirty)) * SEGMENT_SIZE <= stats["bytes_read"] <= len(dirty) * SEGMENT_SIZE * 1.01, (
        stats, sorted(dirty))


def paused_backup(config: Path, name: str, tmp_path: Path):
    """Start a backup that stops at failpoint `storing` (frozen, nothing stored yet); return (process, pause file)."""
    pause = tmp_path / "pause-storing"
    proc = start_cli("backup", name, "--json", config=config, env={"KVM_BORG_FAILPOINT": f"storing:pause={pause}"})
    wait_for(pause.exists, "failpoint storing", proc=proc, timeout=180)
    return proc, pause


def finish(proc, pause: Path) -> dict:
    pause.unlink()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    [result] = json.loads(out)["domains"]
    return result


# Writes between run 1 and run 2: across a segment boundary, into a hole, zeros over data, the last segment.
WRITES_A = [(0x31, 3 * MiB + 200 * KiB, 128 * KiB), (0x32, 17 * MiB + 4 * KiB, 4 * KiB),
            (0x00, 20 * MiB, SEGMENT_SIZE), (0x33, DISK - 64 * KiB, 64 * KiB)]
# Writes while run 2 is frozen: over part of A's, and 512 KiB in a fresh place.
WRITES_B = [(0x41, 3 * MiB + 192 * KiB, 64 * KiB), (0x42, 40 * MiB, 512 * KiB)]


@pytest.mark.parametrize("kind", ["borg", "restic"])
def test_full_then_incremental_runs_restore_each_instant_and_read_only_the_dirty_segments(
        kind, domain_factory, image_dir, tmp_path, scratch):
    domain = domain_factory.make(disks=SPARSE_DISK, name=f"bm-incr-{kind}")
    model = DiskModel.of(domain, "vda", tmp_path / "model")
    repo = repository(kind, tmp_path)
    config = write_config(image_dir / "kb", [repo], plugins=[], **bitmap_settings(scratch_dir=str(scratch)))
    state_dir = image_dir / "kb" / "state"

    # Run 1: no state yet, every segment is read (the holes are zero segments: no data to read).
    ref1 = model.at_instant(tmp_path / "ref1.raw")
    model.take_dirty()
    r1 = backup(config, domain.name)
    assert r1["ok"] and r1["method"] == "bitmap", r1
    d1 = disk_stats(r1)["vda"]
    assert d1["full_read_reason"], d1
    assert d1["segments_total"] == SEGMENTS and d1["segments_dirty"] == SEGMENTS, d1
    assert DISK // 2 <= d1["bytes_read"] <= DISK * 1.01, d1
    a1 = archive_of(r1)

    for write in WRITES_A:
        model.write(*write)
    dirty_a = model.take_dirty()
    ref2 = model.at_instant(tmp_path / "ref2.raw")

    # Run 2, with writes while it is frozen: they are not in its archive, and are in the next one.
    proc, pause = paused_backup(config, domain.name, tmp_path)
    for write in WRITES_B:
        model.write(*write)
    r2 = finish(proc, pause)
    assert r2["ok"] and r2["method"] == "bitmap", r2
    assert_read_only_dirty(disk_stats(r2)["vda"], dirty_a, ref2)
    a2 = archive_of(r2)
    assert changed_segments(repo, a1, a2) == dirty_a  # every write of A changed its segments' content

    dirty_b = model.take_dirty()
    ref3 = model.at_instant(tmp_path / "ref3.raw")
    r3 = backup(config, domain.name)
    assert_read_only_dirty(disk_stats(r3)["vda"], dirty_b, ref3)
    a3 = archive_of(r3)
    assert changed_segments(repo, a2, a3) == dirty_b

    # An unchanged repeat reads nothing and stores the same content.
    r4 = backup(config, domain.name)
    assert_read_only_dirty(disk_stats(r4)["vda"], set(), ref3)
    a4 = archive_of(r4)
    assert changed_segments(repo, a3, a4) == set()

    # Every archive is a complete image of its own instant.
    for archive, reference in ((a1, ref1), (a2, ref2), (a3, ref3)):  # a4 holds a3's content (no file changed)
        assert_restores_to(config, domain.name, "vda", reference, tmp_path, archive=archive)
    methods = {a["name"]: a["method"] for a in list_archives(config, domain.name)}
    assert methods == {a1: "bitmap", a2: "bitmap", a3: "bitmap", a4: "bitmap"}, methods
    assert leftovers(domain.dom, state_dir, scratch) == []
    check = repository_check(kind, location(repo))
    assert check.returncode == 0, check.stderr


def delete_archives(repo: dict, archives: list[str]) -> None:
    """Delete `archives` with the repository's own tools (borg delete + compact / restic forget --prune)."""
    if repo["type"] == "borg":
        run_borg("delete", f"{repo['path']}::{archives[0]}", *archives[1:])
        run_borg("compact", repo["path"])
        return
    ids = [restic_snapshot_id(repo["url"], a) for a in archives]
    subprocess.run([str(RESTIC_BIN), "-r", repo["url"], "forget", "--prune", *ids], check=True, capture_output=True,
                   env=restic_env(), stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind", ["borg", "restic"])
def test_the_newest_archive_alone_restores_equal_once_the_older_ones_are_deleted(kind, domain_factory, image_dir,
                                                                                  tmp_path, scratch):
    domain = domain_factory.make(disks=SPARSE_DISK, name=f"bm-prune-{kind}")
    model = DiskModel.of(domain, "vda", tmp_path / "model")
    repo = repository(kind, tmp_path)
    config = write_config(image_dir / "kb", [repo], plugins=[], **bitmap_settings(scratch_dir=str(scratch)))
    older = [archive_of(backup(config, domain.name))]
    model.write(0x51, 5 * MiB, 300 * KiB)
    older.append(archive_of(backup(config, domain.name)))
    model.write(0x52, 9 * MiB + 100 * KiB, 8 * KiB)
    reference = model.at_instant(tmp_path / "ref.raw")
    newest = archive_of(backup(config, domain.name))

    delete_archives(repo, older)
    assert [a["name"] for a in list_archives(config, domain.name)] == [newest]
    assert_restores_to(config, domain.name, "vda", reference, tmp_path, archive=newest)
    check = repository_check(kind, location(repo))
    assert check.returncode == 0, check.stderr


def test_a_repository_that_missed_runs_gets_a_complete_archive_next_time(domain_factory, image_dir, tmp_path,
                                                                          scratch):
    """Repository `b` is unreachable for one run, repository `c` is added later: their next archive is the
    guest view of its instant, like `a`'s which saw every run."""
    domain = domain_factory.make(disks=SPARSE_DISK, name="bm-missed")
    model = DiskModel.of(domain, "vda", tmp_path / "model")
    a, b, c = (repository("borg", tmp_path, name) for name in "abc")
    config = write_config(image_dir / "kb", [a, b], plugins=[], **bitmap_settings(scratch_dir=str(scratch)))
    backup(config, domain.name)

    model.write(0x61, 2 * MiB, 1 * MiB)
    away = Path(b["path"] + ".away")
    shutil.move(b["path"], away)  # b is gone for this run
    r2 = backup(config, domain.name, expect=(2,))
    stores = {s["repository"]: s for s in r2["stores"]}
    assert stores["a"]["ok"] and not stores["b"]["ok"], r2["stores"]
    shutil.move(away, b["path"])

    model.write(0x62, 30 * MiB, 64 * KiB)
    reference = model.at_instant(tmp_path / "ref.raw")
    config = write_config(image_dir / "kb", [a, b, c], plugins=[], **bitmap_settings(scratch_dir=str(scratch)))
    r3 = backup(config, domain.name)
    for repo in (a, b, c):
        assert_restores_to(config, domain.name, "vda", reference, tmp_path, archive=archive_of(r3, repo["name"]),
                           repository=repo["name"])
    for repo in (b, c):
        check = repository_check("borg", repo["path"])
        assert check.returncode == 0, check.stderr
    # What a repository missed costs reads, not correctness: c, new, read every segment holding data.
    assert disk_stats(r3)["vda"]["bytes_read"] >= DISK // 2
    assert leftovers(domain.dom, image_dir / "kb" / "state", scratch) == []


def test_full_flag_reads_every_segment_again(domain_factory, image_dir, tmp_path, scratch):
    domain = domain_factory.make(disks=SPARSE_DISK, name="bm-full")
    model = DiskModel.of(domain, "vda", tmp_path / "model")
    repo = repository("borg", tmp_path)
    config = write_config(image_dir / "kb", [repo], plugins=[], **bitmap_settings(scratch_dir=str(scratch)))
    backup(config, domain.name)
    model.write(0x71, 11 * MiB, 64 * KiB)
    reference = model.at_instant(tmp_path / "ref.raw")

    r2 = backup(config, domain.name, "--full")
    d2 = disk_stats(r2)["vda"]
    assert d2["full_read_reason"] and d2["segments_dirty"] == SEGMENTS, d2
    assert DISK // 2 <= d2["bytes_read"] <= DISK * 1.01, d2
    assert_restores_to(config, domain.name, "vda", reference, tmp_path, archive=archive_of(r2))
    model.take_dirty()
    # The next run is incremental again, relative to the --full run.
    model.write(0x72, 12 * MiB, 64 * KiB)
    reference = model.at_instant(tmp_path / "ref3.raw")
    r3 = backup(config, domain.name)
    assert_read_only_dirty(disk_stats(r3)["vda"], model.take_dirty(), reference)
    assert_restores_to(config, domain.name, "vda", reference, tmp_path, archive=archive_of(r3))
    assert leftovers(domain.dom, image_dir / "kb" / "state", scratch) == []


def test_the_reference_model_is_the_guest_view(domain_factory, tmp_path):
    """The harness's own promise, on which every compare above rests: after writes through the running VM
    (across segments, zeros over data, into holes, past a live resize), the model equals the guest view
    read by qemu-img from the image QEMU holds open."""
    domain = domain_factory.make(disks=SPARSE_DISK, name="bm-model")
    model = DiskModel.of(domain, "vda", tmp_path / "model")
    for write in WRITES_A + WRITES_B:
        model.write(*write)
    assert model.take_dirty() == {12, 13, 68, 80, 255, 160, 161}
    domain.dom.blockResize("vda", 80 * MiB, 1)  # VIR_DOMAIN_BLOCK_RESIZE_BYTES
    model.resize(80 * MiB)
    model.write(0x27, 70 * MiB, 256 * KiB)
    reference = model.at_instant(tmp_path / "now.raw")
    assert image_virtual_size(domain.disks["vda"], "qcow2") == reference.stat().st_size == 80 * MiB
    assert qemu_img_compare(domain.disks["vda"], reference, "qcow2", "raw")
    model.apply(0x01, 0, 512)  # a write the VM never saw: the compare must notice
    assert not qemu_img_compare(domain.disks["vda"], model.reference, "qcow2", "raw")
