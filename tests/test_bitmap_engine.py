"""The bitmap engine's libvirt side on the real stack (libvirt 9.0 + QEMU 7.2): pull-mode backup jobs,
kvm-borg's checkpoints and their validation, and the snapshot method on a domain that has them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import libvirt
import pytest

from harness import DiskSpec, run_cli
from harness.images import read_guest_bytes
from guest.fixtures import guest_artifacts, guest_factory  # noqa: F401, F811 (fixtures)
from support import assert_back_on_own_images, cli_env, write_config

from kvm_borg.engine import backup_job

MiB = 1 << 20
BLOCK = 64 * 1024


@pytest.fixture
def job_dir(run_dir, domain_factory) -> Path:
    """A short (a socket path holds 107 bytes) private directory for one test's jobs."""
    directory = domain_factory.track_path(tempfile.mkdtemp(prefix="bj", dir=run_dir))
    directory.chmod(0o711)  # QEMU must reach the job's directory below it
    return directory


def run_dir_for(domain, base: Path) -> Path:
    """A per-run directory QEMU can write (it binds the socket and opens the scratch files itself)."""
    directory = base / "r"
    directory.mkdir(mode=0o700)
    owner = backup_job.qemu_owner(domain.dom)
    assert owner is not None and owner != (0, 0)  # this host runs QEMU as its own user
    os.chown(directory, *owner)
    return directory


def begin(domain, directory: Path, name: str | None, disks: list[tuple[str, str | None]], bitmaps=None) -> Path:
    """Start a pull job on `disks` [(target, incremental-from or None)] creating checkpoint `name`."""
    socket = directory / "nbd.sock"
    backup = backup_job.backup_xml(str(socket), [(t, str(directory / f"{t}.scratch"), inc) for t, inc in disks])
    checkpoint = backup_job.checkpoint_xml(name, bitmaps or [(t, "bitmap") for t, _ in disks]) if name else None
    backup_job.begin(domain.dom, backup, checkpoint)
    return socket


def dirty_map(socket: Path, target: str) -> list[tuple[int, int]]:
    """The (offset, length) runs the job's exported bitmap calls dirty (nbdinfo --map)."""
    proc = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:backup-{target}", "--json",
                           f"nbd+unix:///{target}?socket={socket}"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [(e["offset"], e["length"]) for e in json.loads(proc.stdout) if e["type"] & 1]


def kill_qemu(domain) -> None:
    pid = int(Path(f"/run/libvirt/qemu/{domain.name}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while domain.dom.isActive():
        assert time.monotonic() < deadline, "QEMU did not die"
        time.sleep(0.05)


def test_incremental_job_exports_exactly_the_blocks_written_since_the_checkpoint(domain_factory, job_dir):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16), DiskSpec("vdb", "raw", 8, "sparse")])
    directory = run_dir_for(domain, job_dir)
    first = backup_job.new_checkpoint_name(time.time())
    begin(domain, directory, first, [("vda", None), ("vdb", None)], [("vda", "bitmap"), ("vdb", "no")])
    assert backup_job.job_active(domain.dom)
    assert sorted(p.name for p in directory.iterdir()) == ["nbd.sock", "vda.scratch", "vdb.scratch"]
    assert backup_job.abort(domain.dom) is True
    assert not backup_job.job_active(domain.dom) and backup_job.abort(domain.dom) is False
    assert [p.name for p in directory.iterdir()] == []  # libvirt deleted its scratch files (and the socket)
    domain.hmp_write("vda", 0xAB, 3 * MiB, 2 * BLOCK)
    second = backup_job.new_checkpoint_name(time.time())
    socket = begin(domain, directory, second, [("vda", first)])
    try:
        assert dirty_map(socket, "vda") == [(3 * MiB, 2 * BLOCK)]
    finally:
        backup_job.abort(domain.dom)
    assert backup_job.own_checkpoints(domain.dom) == sorted([first, second])
    assert backup_job.checkpoint_bitmap_disks(backup_job.checkpoint_description(domain.dom, first)) == {"vda"}


def test_the_snapshot_method_backs_up_a_domain_with_kvm_borg_checkpoints_and_keeps_them_valid(
        domain_factory, image_dir, job_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)])
    directory = run_dir_for(domain, job_dir)
    name = backup_job.new_checkpoint_name(time.time())
    begin(domain, directory, name, [("vda", None)])
    backup_job.abort(domain.dom)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env(KBTEST_WRITE_AFTER_SNAPSHOT=1))
    assert proc.returncode == 0, proc.stderr
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    assert backup_job.own_checkpoints(domain.dom) == [name]
    assert backup_job.checkpoint_problem(domain.dom, name) is None
    socket = begin(domain, directory, backup_job.new_checkpoint_name(time.time()), [("vda", name)])
    try:  # the write made on the overlay was merged back into the checkpoint's bitmap
        assert dirty_map(socket, "vda") == [(8 * MiB, MiB)]
    finally:
        backup_job.abort(domain.dom)


@pytest.fixture(autouse=True)
def _quiet_libvirt():
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


# --- BitmapSource, used directly ------------------------------------------------------------------

SEGMENT = 256 * 1024


@pytest.fixture
def bitmap_env(run_dir, image_dir, domain_factory):
    """(make_source(domain, full=False) -> BitmapSource, settings, connection): the source the plugin
    would pick for a plan with method "bitmap", over a state_dir short enough for the NBD socket."""
    import dataclasses

    from kvm_borg import config
    from kvm_borg.engine.connection import Connection
    from kvm_borg.engine.libvirt_bitmap import BitmapSource, OfflineBitmapSource
    from kvm_borg.engine.planning import handle_for, make_plan

    state = domain_factory.track_path(tempfile.mkdtemp(prefix="bs", dir=run_dir))
    state.chmod(0o711)
    path = write_config(image_dir / "kb", init=False, state_dir=str(state), method="bitmap")
    settings, _pm = config.load_config(str(path))
    settings = dataclasses.replace(settings, segment_size=SEGMENT, scratch_min_free=MiB)
    connection = Connection(settings.libvirt_uri)

    def make_source(domain, full=False):
        handle = handle_for(connection, domain.name)
        plan = make_plan(handle, settings, [], time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        plan = dataclasses.replace(plan, method="bitmap", full_read=full)
        return (BitmapSource if plan.running else OfflineBitmapSource)(handle, plan, settings)

    yield make_source, settings, connection
    from kvm_borg import journal
    from kvm_borg.engine.libvirt_bitmap import recover_bitmap_entry

    for entry in journal.list_entries(settings.journal_dir):  # a failed test's run: end its job and view
        recover_bitmap_entry(entry, connection, settings)
    connection.close()


def guest_bytes(domain, target: str) -> bytes:
    """The disk's whole guest-visible content, read from its image while the domain runs."""
    return read_guest_bytes(domain.disks[target], domain.formats[target], 0, domain.specs[target].size_mib * MiB)


def segment_files(directory: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in sorted(directory.iterdir()) if p.name != "manifest.json"}


def test_bitmap_source_shows_only_changed_segments_as_changed_and_folds_them(bitmap_env, domain_factory):
    make_source, settings, _connection = bitmap_env
    from kvm_borg import journal, segment_state

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 2), DiskSpec("vdb", "raw", 1, "zero")])
    source = make_source(domain)
    frozen = source.freeze()
    try:
        assert frozen.method == "bitmap"
        stats = {s.target: s for s in frozen.read_stats}
        assert (stats["vda"].full_read_reason, stats["vda"].segments_dirty, stats["vda"].segments_total) == \
            ("no earlier bitmap backup", 8, 8)
        assert stats["vdb"].full_read_reason == "raw disk: no bitmap"
        vda, vdb = frozen.disks
        assert (vda.layout, vda.segment_size, vda.segment_count) == ("segments", SEGMENT, 8)
        assert journal.read_entry(settings.journal_dir, domain.dom.UUIDString()).source == "libvirt-bitmap"
        directory = Path(vda.path)
        manifest = json.loads((directory / "manifest.json").read_text())
        assert (manifest["segment_count"], manifest["virtual_size"], manifest["format"]) == (8, 2 * MiB, "qcow2")
        content = guest_bytes(domain, "vda")
        first = segment_files(directory)
        assert list(first) == [f"{i:08d}" for i in range(8)]
        assert b"".join((directory / name).read_bytes() for name in first) == content
        zeros = segment_files(Path(vdb.path))  # QEMU allocates a raw file's first block: segment 0 is data
        assert [s.st_size for s in zeros.values()] == [SEGMENT, 0, 0, 0]
        assert (Path(vdb.path) / "00000000").read_bytes() == bytes(SEGMENT)
    finally:
        released = source.release()
    assert released.warnings == []
    assert released.bytes_read["vda"] == 2 * MiB
    uuid = domain.dom.UUIDString()
    state = segment_state.load(settings.state_dir, uuid)
    assert backup_job.own_checkpoints(domain.dom) == [state.checkpoint]
    assert journal.read_entry(settings.journal_dir, uuid) is None
    assert not (settings.scratch_dir / uuid).exists()

    domain.hmp_write("vda", 0xC3, MiB + 4096, 4096)  # inside segment 4
    source = make_source(domain)
    frozen = source.freeze()
    try:
        stats = {s.target: s for s in frozen.read_stats}
        assert (stats["vda"].full_read_reason, stats["vda"].segments_dirty) == (None, 1)
        directory = Path(frozen.disks[0].path)
        second = segment_files(directory)
        changed = {name for name in first if (first[name].st_ino, first[name].st_mtime_ns, first[name].st_ctime_ns)
                   != (second[name].st_ino, second[name].st_mtime_ns, second[name].st_ctime_ns)}
        assert changed == {"00000004"}
        assert second["00000004"].st_mtime_ns > max(s.st_mtime_ns for s in first.values())
        assert (directory / "00000004").read_bytes()[4096:8192] == b"\xc3" * 4096
    finally:
        released = source.release()
    assert released.warnings == [] and released.bytes_read["vda"] == SEGMENT
    newer = segment_state.load(settings.state_dir, uuid)
    assert newer.checkpoint != state.checkpoint
    assert backup_job.own_checkpoints(domain.dom) == [newer.checkpoint]  # the older one is gone

    source = make_source(domain, full=True)
    frozen = source.freeze()
    try:
        stats = {s.target: s for s in frozen.read_stats}
        assert (stats["vda"].full_read_reason, stats["vda"].segments_dirty) == ("--full requested", 8)
        third = segment_files(Path(frozen.disks[0].path))
        assert all(third[name].st_ino != second[name].st_ino for name in third)  # a new chain
    finally:
        assert source.release().warnings == []


def test_a_killed_qemu_makes_the_next_run_read_in_full_and_says_why(bitmap_env, domain_factory):
    make_source, settings, _connection = bitmap_env
    from kvm_borg import segment_state

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 1)])
    domain.dom.checkpointCreateXML("<domaincheckpoint><name>mine</name></domaincheckpoint>", 0)  # not ours
    source = make_source(domain)
    source.freeze()
    assert source.release().warnings == []
    [lost] = backup_job.own_checkpoints(domain.dom)  # "mine" is never listed
    assert backup_job.checkpoint_problem(domain.dom, lost) is None
    assert backup_job.checkpoint_problem(domain.dom, "kvm-borg.20000101T000000Z.00000000") == \
        "checkpoint kvm-borg.20000101T000000Z.00000000 missing"
    kill_qemu(domain)  # the bitmap was never written to the image
    domain.start()
    source = make_source(domain)
    frozen = source.freeze()
    try:
        [stats] = frozen.read_stats
        assert stats.full_read_reason.startswith(f"bitmap of checkpoint {lost} unusable (")
        assert "missing or broken bitmap" in stats.full_read_reason
        assert stats.segments_dirty == stats.segments_total == 4
    finally:
        assert source.release().warnings == []
    current = segment_state.load(settings.state_dir, domain.dom.UUIDString()).checkpoint
    assert backup_job.own_checkpoints(domain.dom) == [current] != [lost]  # deleted as metadata only: no bitmap
    assert sorted(c.getName() for c in domain.dom.listAllCheckpoints(0)) == sorted(["mine", current])


def test_recover_ends_what_a_crashed_run_left_and_is_idempotent(bitmap_env, domain_factory):
    make_source, settings, connection = bitmap_env
    from kvm_borg import journal, mountinfo, segment_state
    from kvm_borg.engine.libvirt_bitmap import recover_bitmap_entry

    import dataclasses

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 1)])
    source = make_source(domain)
    deep = domain.dir / ("deep-" * 16)  # too long a path for a unix socket below it
    source.settings = dataclasses.replace(settings, scratch_dir_setting=deep)
    source.freeze()  # ... and kvm-borg dies here: no release
    uuid = domain.dom.UUIDString()
    entry = journal.read_entry(settings.journal_dir, uuid)
    created = entry.extra["checkpoint"]
    assert entry.extra["scratch_dir"] == str(deep / uuid)
    assert entry.extra["socket"] == f"/run/kvm-borg-nbd/{uuid}/nbd.sock"
    assert backup_job.job_active(domain.dom) and backup_job.own_checkpoints(domain.dom) == [created]
    assert mountinfo.entry_at(entry.extra["mountpoint"]) is not None
    report = recover_bitmap_entry(entry, connection, settings)
    assert report.warnings == []
    assert not backup_job.job_active(domain.dom)
    assert backup_job.own_checkpoints(domain.dom) == []  # the state never named it
    assert segment_state.load(settings.state_dir, uuid) is None
    assert mountinfo.entry_at(entry.extra["mountpoint"]) is None
    assert not Path(entry.extra["scratch_dir"]).exists() and not Path(entry.extra["socket"]).parent.exists()
    assert journal.read_entry(settings.journal_dir, uuid) is None
    again = recover_bitmap_entry(entry, connection, settings)
    assert again.warnings == [] and again.actions == []


def test_a_shut_off_domain_is_read_clean_from_its_bitmap_or_not_at_all(bitmap_env, domain_factory):
    make_source, settings, _connection = bitmap_env
    from kvm_borg import segment_state

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 2)])
    source = make_source(domain)
    source.freeze()
    assert source.release().warnings == []
    uuid = domain.dom.UUIDString()
    checkpoint = segment_state.load(settings.state_dir, uuid).checkpoint
    domain.hmp_write("vda", 0x3C, 2 * SEGMENT, BLOCK)  # segment 2, after the checkpoint
    domain.destroy()  # a clean close: the bitmap is stored in the image

    def offline_run(expected_dirty, expected_reason=None):
        source = make_source(domain)
        frozen = source.freeze()
        try:
            [stats] = frozen.read_stats
            assert frozen.consistency == "offline" and stats.full_read_reason == expected_reason
            assert stats.segments_dirty == len(expected_dirty)
            directory = Path(frozen.disks[0].path)
            files = segment_files(directory)
            assert b"".join((directory / n).read_bytes() for n in files) == guest_bytes(domain, "vda")
        finally:
            released = source.release()
        assert released.warnings == [] and not released.inconsistent
        return files

    first = offline_run({2})  # from the checkpoint's bitmap in the image
    assert segment_state.load(settings.state_dir, uuid).checkpoint == checkpoint  # kept: no checkpoint offline
    second = offline_run(set())  # nothing touched the image: clean
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in first.items()} == \
        {n: (s.st_ino, s.st_mtime_ns) for n, s in second.items()}
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 {5 * SEGMENT} {BLOCK}", str(domain.disks["vda"])],
                   check=True, capture_output=True)
    third = offline_run({2, 5})  # the bitmap still records everything since the checkpoint
    assert {n for n in third if third[n].st_mtime_ns != second[n].st_mtime_ns} == {"00000002", "00000005"}
    assert backup_job.own_checkpoints(domain.dom) == [checkpoint]
    assert not list(settings.scratch_dir.iterdir())
    domain.start()
    source = make_source(domain)
    frozen = source.freeze()
    try:
        [stats] = frozen.read_stats
        assert (stats.full_read_reason, stats.segments_dirty) == (None, 2)
    finally:
        assert source.release().warnings == []


def test_a_refused_run_changes_nothing(bitmap_env, domain_factory):
    make_source, settings, _connection = bitmap_env
    import dataclasses

    from kvm_borg import journal
    from kvm_borg.errors import RefusedError

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 1)])
    source = make_source(domain)
    source.settings = dataclasses.replace(settings, scratch_min_free=1 << 60)
    with pytest.raises(RefusedError, match="scratch_min_free"):
        source.freeze()
    assert source.release().warnings == []
    source = make_source(domain)
    source.plan = dataclasses.replace(source.plan, quiesce="required")  # no guest agent in a test domain
    with pytest.raises(RefusedError, match="quiesce is required"):
        source.freeze()
    source.release()
    assert journal.read_entry(settings.journal_dir, domain.dom.UUIDString()) is None
    assert backup_job.own_checkpoints(domain.dom) == [] and not backup_job.job_active(domain.dom)


def test_a_failure_after_the_job_began_still_ends_it_and_leaves_nothing(bitmap_env, domain_factory, monkeypatch):
    make_source, settings, _connection = bitmap_env
    from kvm_borg import journal, segment_state
    from kvm_borg.errors import KvmBorgError

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 1)])
    source = make_source(domain)
    monkeypatch.setenv("KVM_BORG_FAILPOINT", "job-begun:error")
    with pytest.raises(KvmBorgError):
        source.freeze()
    assert backup_job.job_active(domain.dom)
    monkeypatch.delenv("KVM_BORG_FAILPOINT")
    released = source.release()
    assert released.warnings == []
    uuid = domain.dom.UUIDString()
    assert not backup_job.job_active(domain.dom) and backup_job.own_checkpoints(domain.dom) == []
    assert segment_state.load(settings.state_dir, uuid) is None
    assert journal.read_entry(settings.journal_dir, uuid) is None and not (settings.scratch_dir / uuid).exists()


def test_qemu_quitting_during_the_job_is_released_and_the_next_run_is_incremental(bitmap_env, domain_factory):
    make_source, settings, _connection = bitmap_env
    from harness import hmp
    from kvm_borg import journal, segment_state

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 1)])
    source = make_source(domain)
    source.freeze()
    assert source.release().warnings == []
    domain.hmp_write("vda", 0x21, 0, BLOCK)
    source = make_source(domain)
    source.freeze()
    new = journal.read_entry(settings.journal_dir, domain.dom.UUIDString()).extra["checkpoint"]
    try:
        hmp(domain.dom, "quit")  # like a guest powering off: QEMU closes its images cleanly and exits
    except (libvirt.libvirtError, RuntimeError):
        pass  # the monitor may go away before it answers
    deadline = time.monotonic() + 30
    while domain.dom.isActive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    released = source.release()
    assert released.warnings == []
    assert segment_state.load(settings.state_dir, domain.dom.UUIDString()).checkpoint == new  # folded
    assert journal.read_entry(settings.journal_dir, domain.dom.UUIDString()) is None
    assert len(backup_job.own_checkpoints(domain.dom)) == 2  # the older one waits for a running domain
    domain.start()
    domain.hmp_write("vda", 0x22, 3 * SEGMENT, BLOCK)
    source = make_source(domain)
    frozen = source.freeze()
    try:
        [stats] = frozen.read_stats
        assert (stats.full_read_reason, stats.segments_dirty) == (None, 1)
    finally:
        assert source.release().warnings == []
    assert len(backup_job.own_checkpoints(domain.dom)) == 1


# --- through `kvm-borg backup` and `kvm-borg recover` ---------------------------------------------


def test_a_backup_killed_mid_store_is_recovered_and_loses_no_change(domain_factory, image_dir, run_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 2)])
    state = domain_factory.track_path(tempfile.mkdtemp(prefix="bc", dir=run_dir))
    state.chmod(0o711)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", state_dir=str(state), method="bitmap",
                          segment_size="256KiB")

    def backup(**env):
        proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env(**env))
        return proc, (json.loads(proc.stdout)["domains"][0]["disks"][0] if proc.stdout.strip() else None)

    proc, first = backup()
    assert proc.returncode == 0, proc.stderr
    assert (first["full_read_reason"], first["segments_dirty"], first["bytes_read"]) == ("no earlier bitmap backup", 8, 2 * MiB)
    [kept] = backup_job.own_checkpoints(domain.dom)
    domain.hmp_write("vda", 0x99, 6 * SEGMENT, BLOCK)
    proc, _ = backup(KVM_BORG_FAILPOINT="storing:kill")
    assert proc.returncode == -signal.SIGKILL
    assert backup_job.job_active(domain.dom) and len(backup_job.own_checkpoints(domain.dom)) == 2
    proc = run_cli("recover", domain.name, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert not backup_job.job_active(domain.dom)
    assert backup_job.own_checkpoints(domain.dom) == [kept]  # the killed run's checkpoint is gone, not the state's
    assert list((state / "journal").glob("*.json")) == [] and not list((state / "scratch").iterdir())
    proc, third = backup()
    assert proc.returncode == 0, proc.stderr
    assert (third["full_read_reason"], third["segments_dirty"], third["bytes_read"]) == (None, 1, SEGMENT)
    assert len(backup_job.own_checkpoints(domain.dom)) == 1 and backup_job.own_checkpoints(domain.dom) != [kept]


@pytest.mark.slow
def test_a_quiesced_bitmap_backup_of_a_real_guest_freezes_once_and_stores_a_clean_file_system(
        guest_factory, image_dir, tmp_path):  # noqa: F811 (a fixture)
    from guest import build
    from support import archived_meta, extract_archive

    g = guest_factory(fmt="qcow2", size_mib=16)
    build.wait_for_agent(g.dom, timeout=180)
    build.wait_for_progress(g.console_log, 3, timeout=180)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", method="bitmap", quiesce="required")
    proc = run_cli("backup", g.name, "--json", config=config, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    assert (result["method"], result["consistency"]) == ("bitmap", "quiesced")
    hooks = [value for kind, value in ((e.kind, e.value) for e in build.serial_events(g.console_log)) if kind == "hook"]
    assert hooks == ["freeze", "thaw"]  # fsFreeze before backupBegin, fsThaw right after, once
    during = build.serial_last_seq(g.console_log)
    build.wait_for_progress(g.console_log, during + 3, timeout=60)  # the guest writes on after the thaw
    assert build.serial_errors(g.console_log) == []
    extracted = extract_archive(tmp_path / "repo", result["stores"][0]["archive"], tmp_path / "x")
    [disk] = archived_meta(extracted)["disks"]
    assert disk["layout"] == "segments"
    directory = extracted / disk["archive_path"]
    image = tmp_path / "vda.raw"
    with open(image, "wb") as out:  # segments in order; an empty one reads as zeros
        for index in range(disk["segments"]["count"]):
            segment = directory / f"{index:08d}"
            length = min(disk["segments"]["size"], disk["virtual_size"] - index * disk["segments"]["size"])
            data = segment.read_bytes()
            out.write(data if data else bytes(length))
    fsck = build.fsck_image(image, repair_first=False)  # frozen: clean without a journal replay
    assert fsck.clean, fsck.output
