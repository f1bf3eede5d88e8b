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


def test_a_bitmap_lost_to_a_killed_qemu_is_named_and_its_checkpoint_still_deletes(domain_factory, job_dir):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8)])
    directory = run_dir_for(domain, job_dir)
    domain.dom.checkpointCreateXML("<domaincheckpoint><name>mine</name></domaincheckpoint>", 0)  # not ours
    kept = backup_job.new_checkpoint_name(time.time())
    begin(domain, directory, kept, [("vda", None)])
    backup_job.abort(domain.dom)
    assert backup_job.checkpoint_problem(domain.dom, kept) is None
    assert backup_job.checkpoint_problem(domain.dom, "kvm-borg.20000101T000000Z.00000000") == \
        "checkpoint kvm-borg.20000101T000000Z.00000000 missing"
    assert backup_job.own_checkpoints(domain.dom) == [kept]  # "mine" is never listed
    kill_qemu(domain)  # the bitmaps were never written to the image
    assert backup_job.delete_checkpoint(domain.dom, kept) == "kept: the domain is not running"
    domain.start()
    problem = backup_job.checkpoint_problem(domain.dom, kept)
    assert problem.startswith(f"bitmap of checkpoint {kept} unusable (") and "missing or broken bitmap" in problem
    assert backup_job.delete_checkpoint(domain.dom, kept) == "deleted metadata only"
    assert backup_job.delete_checkpoint(domain.dom, kept) is None
    assert [c.getName() for c in domain.dom.listAllCheckpoints(0)] == ["mine"]


def test_a_cleanly_stopped_domain_keeps_a_valid_bitmap_a_killed_one_does_not(domain_factory, job_dir):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8)])
    directory = run_dir_for(domain, job_dir)
    name = backup_job.new_checkpoint_name(time.time())
    begin(domain, directory, name, [("vda", None)])
    backup_job.abort(domain.dom)
    domain.destroy()  # SIGTERM: QEMU closes the image cleanly and stores the bitmap
    domain.start()
    assert backup_job.checkpoint_problem(domain.dom, name) is None
    domain.hmp_write("vda", 0x5A, 0, BLOCK)
    kill_qemu(domain)  # now the stored bitmap is marked in use: inconsistent
    domain.start()
    assert "missing or broken bitmap" in backup_job.checkpoint_problem(domain.dom, name)
    assert backup_job.delete_checkpoint(domain.dom, name) == "deleted"
    assert backup_job.own_checkpoints(domain.dom) == []


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
