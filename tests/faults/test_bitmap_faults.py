"""The fault matrix of the bitmap method (issue 15): faults injected into real bitmap backups.

Most rows use an OS-less KVM test domain whose every write goes through HMP qemu-io AND into a raw
reference model (tests/harness/bitmap.py): "0 data lost" is then exact — the archive of the run after
the fault restores to exactly the model at its instant. Rows that need a real guest (a shutdown from
inside, a guest paused by a full scratch file system) use the TCG Linux guest of tests/guest and its
checksummed records. After every fault: `kvm-borg recover` (where the run could not finish) leaves
no backup job, journal entry, scratch file, mounted view, view process or stray `kvm-borg.*`
checkpoint; the guest is not paused; the next backup succeeds and its archive is correct; the
repository checks clean. Each test adds its row to the report (tests/faults/fault_report.py).

`test_bitmap_libvirtd_restarted_during_the_job` restarts libvirtd under every other test on the
machine: run it only on a machine of your own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from guest import build
from harness import DiskSpec, run_cli, start_cli, tmpfs, wait_for
from harness.bitmap import (
    KiB,
    MiB,
    DiskModel,
    all_checkpoints,
    archive_of,
    assert_restores_to,
    backup,
    bitmap_settings,
    disk_stats,
    journal_entries,
    kill_qemu,
    leftovers,
    own_checkpoints,
    qemu_io_offline,
    repository_check,
    restore_disk,
    segment_count,
    short_scratch_dir,
    state_checkpoint,
    usable_bitmaps,
)
from harness.cli import borg_env
from support import write_config

pytestmark = pytest.mark.slow

# The failpoints a bitmap run reaches, in order (src/kvm_borg/engine/libvirt_bitmap.py and the pipeline):
# `journal-written` (entry on disk, no job yet), `job-begun` (job running, its checkpoint created, no view
# yet), `storing` (view mounted, nothing stored yet), `release` (stored; view, job, state fold and
# checkpoint deletion still to come).
BITMAP_STAGES = ["journal-written", "job-begun", "storing", "release"]
BY_REFERENCE = "n/a: archive = reference"


@dataclass
class Case:
    """An OS-less test domain with its reference models, a bitmap config and its borg repository."""

    domain: object  # harness TestDomain
    models: dict[str, DiskModel]
    config: Path
    state: Path
    repo: Path
    tmp: Path
    scratch: Path | None = None
    runs: int = 0
    archives: list[str] = field(default_factory=list)

    @property
    def dom(self):
        return self.domain.dom

    def write(self, target: str, pattern: int, offset: int, length: int) -> None:
        self.models[target].write(pattern, offset, length)

    def backup(self, *args, expect=(0,), env=None) -> dict:
        self.runs += 1
        result = backup(self.config, self.domain.name, *args, expect=expect, env=env)
        if result["ok"]:
            self.archives.append(archive_of(result))
        return result

    def references(self, tag: str) -> dict[str, Path]:
        """Copy every model as it is now: the references of a backup taken now."""
        return {t: m.at_instant(self.tmp / f"ref-{tag}-{t}.raw") for t, m in self.models.items()}

    def assert_archive_is(self, archive: str, references: dict[str, Path]) -> None:
        for target, reference in references.items():
            fmt = self.domain.formats[target]
            assert_restores_to(self.config, self.domain.name, target, reference, self.tmp, archive=archive, fmt=fmt)


@pytest.fixture
def short_dirs(run_dir):
    """make() -> a new short directory below the run's (scratch_dir, tmpfs mount points: the NBD socket
    path must fit in 107 bytes); all removed after the test."""
    made = []

    def make() -> Path:
        made.append(short_scratch_dir(run_dir))
        return made[-1]

    yield make
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def case(domain_factory, image_dir, tmp_path, short_dirs):
    """make(disks=[DiskSpec...], **settings) -> Case: a running OS-less domain (64 MiB sparse qcow2 vda by
    default), models of its disks, a bitmap config (256 KiB segments) with an initialised borg repository."""

    def make(disks=None, **settings) -> Case:
        disks = disks or [DiskSpec("vda", "qcow2", 64, fill="sparse")]
        domain = domain_factory.make(disks=disks)
        models = {d.target: DiskModel.of(domain, d.target, tmp_path / "model") for d in disks}
        repo = tmp_path / "repo"
        settings.setdefault("scratch_dir", str(short_dirs()))
        config = write_config(image_dir / "kb", repo_path=repo, plugins=[], **bitmap_settings(**settings))
        scratch = Path(settings["scratch_dir"])
        return Case(domain, models, config, image_dir / "kb" / "state", repo, tmp_path, scratch)

    return make


def recover(case_or_config, *args: str) -> subprocess.CompletedProcess:
    config = getattr(case_or_config, "config", case_or_config)
    proc = run_cli("recover", *args, config=config)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc


def settle_and_verify(case: Case, row: dict, *, recovered: bool = False, verified: bool = False) -> dict | None:
    """The invariants every fault must leave, filling the report row as they are shown. Unless the test
    already `verified` an archive taken after the fault equals the models, one more write and backup
    whose archive must equal them; return that run's JSON result (None when `verified`)."""
    problems = leftovers(case.dom, case.state, case.scratch)
    assert problems == [], problems
    row["recovered"] = "yes (by recover)" if recovered else "yes (by the run)"
    dom = case.dom
    if not dom.isActive():
        dom.create()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, dom.state()
    result = None
    if not verified:
        for target, model in case.models.items():  # one more write, somewhere no fault wrote
            model.write(0x5E, 13 * MiB + 64 * KiB, 64 * KiB)
        references = case.references(f"verify-{case.runs}")
        result = case.backup(expect=(0, 1))
        assert result["ok"], result
        case.assert_archive_is(archive_of(result), references)
    row["records_lost"] = BY_REFERENCE
    assert leftovers(case.dom, case.state, case.scratch) == []
    check = repository_check("borg", case.repo)
    row["repo_check"] = "ok" if check.returncode == 0 else f"FAILED ({check.returncode})"
    assert check.returncode == 0, check.stderr
    row["runs"] = case.runs
    return result


def paused_at(case: Case, point: str, **env) -> tuple[subprocess.Popen, Path]:
    """Start a backup that stops at failpoint `point`; return (process, pause file) once it is there."""
    pause = case.tmp / f"pause-{point}"
    proc = start_cli("backup", case.domain.name, "--json", config=case.config,
                     env={"KVM_BORG_FAILPOINT": f"{point}:pause={pause}", **env})
    wait_for(pause.exists, f"failpoint {point}", proc=proc, timeout=180)
    case.runs += 1
    return proc, pause


def finish(proc: subprocess.Popen, pause: Path | None = None, timeout: float = 300) -> tuple[int, dict | None, str]:
    """Let a paused run go on (delete its pause file) and wait for it; return (exit code, its domain's JSON
    result or None, stderr)."""
    if pause is not None:
        pause.unlink(missing_ok=True)
    out, err = proc.communicate(timeout=timeout)
    print(f"$ {' '.join(map(str, proc.args))}  -> exit {proc.returncode}\n--- stdout\n{out}--- stderr\n{err}")
    result = json.loads(out)["domains"][0] if out.strip() else None
    return proc.returncode, result, err


def full_read_reasons(result: dict) -> dict[str, str | None]:
    return {t: d["full_read_reason"] for t, d in disk_stats(result).items()}


def warned_about(result: dict, target: str) -> bool:
    return any(target in w for w in result["warnings"])


# --- SIGKILL of kvm-borg at each stage ------------------------------------------------------------


@pytest.mark.parametrize("point", BITMAP_STAGES)
def test_bitmap_sigkill_at_each_stage_is_completed_by_recover(point, case, report_row):
    """A killed run leaves nothing behind after `recover`, and the next run misses none of the writes made
    before it (a checkpoint created by a run that never stored must not make the next one skip them)."""
    report_row["fault"] = f"bitmap: SIGKILL of backup at {point}"
    c = case()
    c.backup()
    c.write("vda", 0x21, 6 * MiB + 100 * KiB, 200 * KiB)
    c.runs += 1
    proc = start_cli("backup", c.domain.name, "--json", config=c.config, env={"KVM_BORG_FAILPOINT": f"{point}:kill"})
    rc, _, err = finish(proc)
    assert rc == -signal.SIGKILL, err
    assert len(journal_entries(c.state)) == 1  # the journal knows what was in flight
    recover(c)
    settle_and_verify(c, report_row, recovered=True)


# --- the domain's bitmaps are lost or broken between runs -----------------------------------------


def test_bitmap_virsh_destroy_between_runs(case, report_row):
    """`virsh destroy` (SIGTERM, then SIGKILL after 10 s): measured on QEMU 7.2, QEMU closes the image on
    SIGTERM and its bitmaps stay consistent; kvm-borg may use them then. Whatever it decides, the next
    archive is exact, and a bitmap QEMU left in use must cost a full read with a warning."""
    report_row["fault"] = "bitmap: virsh destroy between runs"
    c = case()
    c.backup()
    c.write("vda", 0x22, 7 * MiB, 64 * KiB)
    c.dom.destroy()
    broken = state_checkpoint(c.state, c.dom.UUIDString()) not in usable_bitmaps(c.domain.disks["vda"])
    c.dom.create()
    c.write("vda", 0x23, 9 * MiB, 64 * KiB)
    references = c.references("after-destroy")
    result = c.backup(expect=(0, 1))
    c.assert_archive_is(archive_of(result), references)
    if broken:
        assert full_read_reasons(result)["vda"] and warned_about(result, "vda"), result
    else:
        assert disk_stats(result)["vda"]["segments_dirty"] in (2, segment_count(64 * MiB)), result
    settle_and_verify(c, report_row, verified=True)


def test_bitmap_qemu_killed_between_runs_costs_a_full_read_with_a_warning(case, report_row):
    report_row["fault"] = "bitmap: QEMU SIGKILLed between runs (bitmap inconsistent)"
    c = case()
    c.backup()
    c.write("vda", 0x24, 7 * MiB, 64 * KiB)
    kill_qemu(c.dom)
    # QEMU never wrote the checkpoint's bitmap back: in-use, or (created in this QEMU's life) absent.
    assert state_checkpoint(c.state, c.dom.UUIDString()) not in usable_bitmaps(c.domain.disks["vda"])
    c.dom.create()
    c.write("vda", 0x25, 9 * MiB, 64 * KiB)
    references = c.references("after-kill")
    result = c.backup(expect=(0, 1))
    c.assert_archive_is(archive_of(result), references)
    assert full_read_reasons(result)["vda"], result
    assert disk_stats(result)["vda"]["segments_dirty"] == segment_count(64 * MiB)
    # Issue 15: "read in full this run, with a warning naming the reason" (exit 1, like every warning).
    assert warned_about(result, "vda") and result["exit_code"] == 1, (result["warnings"], result["exit_code"])
    settle_and_verify(c, report_row, verified=True)


def test_bitmap_qemu_killed_during_the_job(case, report_row):
    """QEMU dies while the run is frozen (the NBD export goes with it): the run ends by itself, stores no
    archive it could not read, and the next run reads the disk in full."""
    report_row["fault"] = "bitmap: QEMU killed during the job"
    c = case()
    c.backup()
    c.write("vda", 0x26, 10 * MiB, 64 * KiB)
    at_freeze = c.references("at-freeze")
    proc, pause = paused_at(c, "storing")
    kill_qemu(c.dom)
    rc, result, err = finish(proc, pause)
    assert rc in (1, 2), err
    if result and result["stores"] and result["stores"][0]["ok"]:  # whatever it stored is the frozen view
        c.assert_archive_is(result["stores"][0]["archive"], at_freeze)
    recovered = bool(journal_entries(c.state))
    if recovered:
        recover(c)
    c.dom.create()
    nxt = settle_and_verify(c, report_row, recovered=recovered)
    assert full_read_reasons(nxt)["vda"], nxt


def test_bitmap_disk_resized_between_runs(case, report_row):
    report_row["fault"] = "bitmap: disk resized between runs"
    c = case()
    c.backup()
    c.dom.blockResize("vda", 80 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    c.models["vda"].resize(80 * MiB)
    c.write("vda", 0x27, 70 * MiB, 256 * KiB)  # beyond the old end
    references = c.references("resized")
    result = c.backup(expect=(0, 1))
    stats = disk_stats(result)["vda"]
    assert stats["full_read_reason"] and stats["segments_total"] == segment_count(80 * MiB), stats
    c.assert_archive_is(archive_of(result), references)
    settle_and_verify(c, report_row, verified=True)


def test_bitmap_image_replaced_by_a_restore(case, report_row):
    """The disk restored from an older archive over the original image (a new file without bitmaps):
    the next run reads it in full, and its archive is the restored content plus the new writes."""
    report_row["fault"] = "bitmap: image replaced by a restore"
    c = case()
    first = c.references("first")
    c.backup()
    c.write("vda", 0x28, 4 * MiB, 1 * MiB)
    c.backup()
    c.dom.destroy()
    image = c.domain.disks["vda"]
    inode = image.stat().st_ino
    proc = run_cli("restore", c.domain.name, "--archive", c.archives[0], "--overwrite", config=c.config)
    assert proc.returncode == 0, proc.stderr
    assert image.stat().st_ino != inode  # a new file, as a restore writes it
    subprocess.run(["cp", "--sparse=always", str(first["vda"]), str(c.models["vda"].reference)], check=True)
    c.dom.create()
    c.write("vda", 0x29, 22 * MiB, 64 * KiB)
    references = c.references("after-restore")
    result = c.backup(expect=(0, 1))
    assert full_read_reasons(result)["vda"], result
    c.assert_archive_is(archive_of(result), references)
    settle_and_verify(c, report_row, verified=True)


def test_bitmap_foreign_checkpoint_is_never_deleted(case, report_row):
    report_row["fault"] = "bitmap: a foreign checkpoint present"
    c = case()
    c.dom.checkpointCreateXML("<domaincheckpoint><name>foreign-tool.1</name></domaincheckpoint>", 0)
    c.backup()
    c.write("vda", 0x2A, 14 * MiB, 64 * KiB)
    references = c.references("second")
    result = c.backup()
    assert disk_stats(result)["vda"]["full_read_reason"] is None, result
    c.assert_archive_is(archive_of(result), references)
    settle_and_verify(c, report_row, verified=True)
    assert "foreign-tool.1" in all_checkpoints(c.dom) and len(own_checkpoints(c.dom)) == 1


def test_bitmap_mixed_raw_and_qcow2_disks(case, report_row):
    """A raw disk has no persistent bitmap: read in full every run (with its reason), beside an
    incremental qcow2 disk."""
    report_row["fault"] = "bitmap: mixed raw + qcow2 disks"
    c = case(disks=[DiskSpec("vda", "qcow2", 64, fill="sparse"), DiskSpec("vdb", "raw", 16)])
    c.backup()
    c.write("vda", 0x2B, 15 * MiB, 64 * KiB)
    c.write("vdb", 0x2C, 3 * MiB, 64 * KiB)
    references = c.references("second")
    result = c.backup(expect=(0, 1))
    stats = disk_stats(result)
    assert stats["vda"]["full_read_reason"] is None and stats["vda"]["segments_dirty"] == 1, stats
    assert stats["vdb"]["full_read_reason"], stats
    c.assert_archive_is(archive_of(result), references)
    settle_and_verify(c, report_row, verified=True)


def test_bitmap_shut_off_domain_written_offline_with_qemu_io(case, report_row):
    """Offline runs make no checkpoint; a write made with qemu-io while the domain is off is in the next
    offline archive and is never skipped by the first live run after it."""
    report_row["fault"] = "bitmap: shut-off domain written offline with qemu-io"
    c = case()
    c.backup()
    c.dom.destroy()
    own = own_checkpoints(c.dom)
    off = c.backup(expect=(0, 1))
    assert off["consistency"] == "offline", off
    image = c.domain.disks["vda"]
    qemu_io_offline(image, "qcow2", 0x2D, 18 * MiB, 64 * KiB)
    c.models["vda"].apply(0x2D, 18 * MiB, 64 * KiB)
    references = c.references("offline-write")
    written = c.backup(expect=(0, 1))
    assert disk_stats(written)["vda"]["full_read_reason"] or disk_stats(written)["vda"]["segments_dirty"] >= 1
    c.assert_archive_is(archive_of(written), references)
    unchanged = c.backup(expect=(0, 1))  # the image untouched since the last offline run: nothing to read
    stats = disk_stats(unchanged)["vda"]
    assert stats["segments_dirty"] == 0 and stats["bytes_read"] == 0, stats
    c.assert_archive_is(archive_of(unchanged), references)
    assert own_checkpoints(c.dom) == own  # no checkpoint is made offline
    c.dom.create()
    settle_and_verify(c, report_row)  # the first live run after them: includes the offline write


# --- the run's own resources fail -----------------------------------------------------------------


def test_bitmap_borg_files_cache_deleted(case, report_row):
    """borg forgets what it stored: every segment is read again (time), the archive is exact (never data)."""
    report_row["fault"] = "bitmap: borg files cache deleted"
    c = case()
    c.backup()
    c.write("vda", 0x2E, 19 * MiB, 64 * KiB)
    info = json.loads(subprocess.run([str(Path(borg_env()["BORG_BIN"])), "info", "--json", str(c.repo)],
                                     capture_output=True, text=True, env=borg_env(), check=True).stdout)
    caches = list(Path(info["cache"]["path"]).glob("files*"))
    assert caches, info["cache"]
    for path in caches:
        path.unlink()
    references = c.references("no-files-cache")
    result = c.backup()
    stats = disk_stats(result)["vda"]
    assert stats["bytes_read"] >= 32 * MiB, stats  # every segment holding data was read again
    c.assert_archive_is(archive_of(result), references)
    settle_and_verify(c, report_row, verified=True)


def test_bitmap_scratch_file_system_full_before_the_run_is_refused_cleanly(case, short_dirs, report_row):
    """scratch_dir with less free space than scratch_min_free: the run refuses before any job starts,
    naming the directory; nothing changes."""
    report_row["fault"] = "bitmap: scratch file system below scratch_min_free"
    with tmpfs(short_dirs(), "2m", "mode=0755") as scratch:
        c = case(scratch_dir=str(scratch), scratch_min_free="8MiB")
        result = c.backup(expect=(2,))
        assert not result["ok"] and str(scratch) in result["error"], result
        assert own_checkpoints(c.dom) == [] and leftovers(c.dom, c.state, scratch) == []
        c.config = write_config(c.config.parent, repo_path=c.repo, plugins=[], init=False,
                                **bitmap_settings(scratch_dir=str(scratch), scratch_min_free="1MiB"))
        settle_and_verify(c, report_row)


def restart_libvirtd() -> None:
    """Stop libvirtd and start it again (as tests/faults/test_fault_matrix.py does)."""
    pid = int(Path("/run/libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "libvirtd to stop", timeout=60)
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_for(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode
             == 0, "libvirtd to answer", timeout=60)


def test_bitmap_libvirtd_restarted_during_the_job(case, report_row):
    """RESTARTS libvirtd: do not run it on a shared machine. The job survives in QEMU; the run ends it
    (or recover does), and the next run's archive is exact."""
    report_row["fault"] = "bitmap: libvirtd restarted during the job"
    c = case()
    c.backup()
    c.write("vda", 0x2F, 21 * MiB, 64 * KiB)
    at_freeze = c.references("at-freeze")
    proc, pause = paused_at(c, "storing")
    restart_libvirtd()
    rc, result, err = finish(proc, pause)
    assert rc in (0, 1, 2), err
    if result and result["stores"] and result["stores"][0]["ok"]:
        c.assert_archive_is(result["stores"][0]["archive"], at_freeze)
    recovered = bool(journal_entries(c.state))
    if recovered:
        recover(c)
    settle_and_verify(c, report_row, recovered=recovered)


# --- rows with the real Linux guest ---------------------------------------------------------------


@dataclass
class GuestCase:
    guest: build.Guest
    conn: object
    config: Path
    state: Path
    repo: Path
    tmp: Path
    scratch: Path | None = None
    max_seen: int = 0
    runs: int = 0

    @property
    def dom(self):
        return self.conn.lookupByName(self.guest.name)

    def note_console(self) -> None:
        self.max_seen = max(self.max_seen, build.serial_last_seq(self.guest.console_log) or 0)


@pytest.fixture
def guest_case(guest_factory, image_dir, tmp_path, libvirt_conn, short_dirs):
    """make(data_disk=None, **settings) -> GuestCase: the writing TCG guest on a qcow2 data disk with its
    agent up, and a bitmap config with an initialised borg repository."""

    def make(data_disk=None, **settings) -> GuestCase:
        kwargs = {"data_disk": data_disk} if data_disk else {}
        guest = guest_factory(fmt="qcow2", size_mib=64, **kwargs)
        repo = tmp_path / "repo"
        settings.setdefault("scratch_dir", str(short_dirs()))
        config = write_config(image_dir / "kb", repo_path=repo, plugins=[], **bitmap_settings(**settings))
        build.wait_for_agent(guest.dom, 90)
        build.wait_for_progress(guest.console_log, 5, 60)
        scratch = Path(settings["scratch_dir"])
        return GuestCase(guest, libvirt_conn, config, image_dir / "kb" / "state", repo, tmp_path, scratch)

    return make


def settle_guest(gc: GuestCase, row: dict, *, recovered: bool) -> None:
    """The real guest's invariants: nothing left, guest running and writing, next backup ok and its
    archive a clean file system with a gap-free prefix of records, 0 records lost, repository clean."""
    gc.note_console()
    problems = leftovers(gc.dom, gc.state, gc.scratch)
    assert problems == [], problems
    row["recovered"] = "yes (by recover)" if recovered else "yes (by the run)"
    dom = gc.dom
    if not dom.isActive():
        dom.create()
        build.wait_for_agent(dom, 90)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, dom.state()
    build.wait_for_progress(gc.guest.console_log, (build.serial_last_seq(gc.guest.console_log) or 0) + 5, 90)
    assert build.serial_errors(gc.guest.console_log) == []
    gc.runs += 1
    result = backup(gc.config, gc.guest.name, expect=(0, 1))
    assert result["ok"], result
    restored = restore_disk(gc.config, gc.guest.name, "vda", gc.tmp / f"restored-{gc.runs}.qcow2",
                            archive_of(result))
    fsck = build.fsck_image(restored, repair_first=result["consistency"] != "quiesced")
    assert fsck.clean, fsck.output
    assert build.check_records(build.read_records(restored)).ok
    assert leftovers(gc.dom, gc.state, gc.scratch) == []
    gc.note_console()
    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    build.wait_for_shutoff(dom, 90)
    gc.note_console()
    check = build.check_records(build.read_records(gc.guest.data_disk))
    lost = max(0, gc.max_seen - (check.last_seq or 0))
    row["records_lost"] = lost
    assert check.gap_free, check.errors
    assert lost == 0, f"guest reported seq {gc.max_seen}, image ends at {check.last_seq}"
    repo_check = repository_check("borg", gc.repo)
    row["repo_check"] = "ok" if repo_check.returncode == 0 else f"FAILED ({repo_check.returncode})"
    assert repo_check.returncode == 0, repo_check.stderr
    row["runs"] = gc.runs


def test_bitmap_guest_shut_down_during_the_job(guest_case, report_row):
    """The guest powers itself off while the run is frozen: QEMU exits and the job with it. The run ends
    by itself; nothing is left; the next (offline, then live) backups are correct; no record is lost."""
    report_row["fault"] = "bitmap: guest shut down during the job"
    gc = guest_case()
    gc.runs += 1
    assert backup(gc.config, gc.guest.name, expect=(0, 1))["ok"]
    pause = gc.tmp / "pause-storing"
    proc = start_cli("backup", gc.guest.name, "--json", config=gc.config,
                     env={"KVM_BORG_FAILPOINT": f"storing:pause={pause}"})
    wait_for(pause.exists, "failpoint storing", proc=proc, timeout=180)
    gc.runs += 1
    gc.note_console()
    gc.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    build.wait_for_shutoff(gc.dom, 90)
    gc.note_console()
    rc, result, err = finish(proc, pause)
    assert rc in (0, 1, 2) and "Traceback" not in err, err
    recovered = bool(journal_entries(gc.state))
    if recovered:
        recover(gc.config)
    # Offline now: a backup of the shut-off guest is the image itself.
    gc.runs += 1
    off = backup(gc.config, gc.guest.name, expect=(0, 1))
    assert off["ok"] and off["consistency"] == "offline", off
    restored = restore_disk(gc.config, gc.guest.name, "vda", gc.tmp / "restored-offline.qcow2", archive_of(off))
    assert build.fsck_image(restored, repair_first=False).clean
    settle_guest(gc, report_row, recovered=recovered)


def make_filled_qcow2(path: Path, size_mib: int, random_mib: int) -> Path:
    """A qcow2 ext4 data disk (label kbdata, as the guest mounts it) holding `random_mib` MiB of random data in
    /bulk.bin, so that a guest overwrite makes the backup job copy old data into its scratch file."""
    tree = path.with_name(path.name + ".tree")
    tree.mkdir()
    with open(tree / "bulk.bin", "wb") as handle:
        handle.write(os.urandom(random_mib * MiB))
    raw = path.with_name(path.name + ".raw")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "kbdata", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    "-d", str(tree), str(raw), f"{size_mib}M"], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    shutil.rmtree(tree)
    os.chmod(path, 0o644)
    return path


def test_bitmap_scratch_file_system_full_during_the_job(guest_case, image_dir, short_dirs, report_row):
    """The guest overwrites data while the run is frozen: the job copies the old data into its scratch
    file, whose 4 MiB file system fills. The guest may pause on the write error; the run ends, resumes
    it, and leaves nothing; whatever it stored is a clean file system; no record is lost."""
    report_row["fault"] = "bitmap: scratch file system full during the job"
    disk = make_filled_qcow2(image_dir / "filled.qcow2", 64, 24)
    with tmpfs(short_dirs(), "4m", "mode=0755") as scratch:
        gc = guest_case(data_disk=disk, scratch_dir=str(scratch), scratch_min_free="1MiB")
        pause = gc.tmp / "pause-storing"
        proc = start_cli("backup", gc.guest.name, "--json", config=gc.config,
                         env={"KVM_BORG_FAILPOINT": f"storing:pause={pause}"})
        wait_for(pause.exists, "failpoint storing", proc=proc, timeout=180)
        gc.runs += 1
        build.agent_command(gc.dom, "guest-exec", {"path": "/bin/sh", "arg": [
            "-c", "dd if=/dev/urandom of=/data/bulk.bin bs=1M count=12 conv=notrunc,fsync"]})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and gc.dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
            time.sleep(0.2)
        gc.note_console()
        rc, result, err = finish(proc, pause)
        assert rc in (0, 1, 2) and "Traceback" not in err, err
        assert gc.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, gc.dom.state()
        if result and result["stores"] and result["stores"][0]["ok"]:
            restored = restore_disk(gc.config, gc.guest.name, "vda", gc.tmp / "restored-full.qcow2",
                                    result["stores"][0]["archive"])
            assert build.fsck_image(restored, repair_first=result["consistency"] != "quiesced").clean
        recovered = bool(journal_entries(gc.state))
        if recovered:
            recover(gc.config)
        settle_guest(gc, report_row, recovered=recovered)

