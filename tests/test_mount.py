"""`kvm-borg mount` / `umount`: file-level restore against real libvirtd + QEMU + borg."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from harness import DiskSpec, run_cli
from support import cli_env, write_config

MiB = 1 << 20


def write_mbr(path: Path, partitions: list[tuple[int, int]]) -> None:
    """Write a DOS partition table with Linux partitions [(start sector, sectors)] into a raw image."""
    mbr = bytearray(512)
    for i, (start, count) in enumerate(partitions):
        mbr[446 + 16 * i:462 + 16 * i] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, count)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as handle:
        handle.write(mbr)


def make_ext4(image: Path, content: Path, *, offset: int = 0, size_mib: int) -> None:
    subprocess.run(["mkfs.ext4", "-F", "-q", "-E", f"offset={offset}", "-d", str(content), str(image),
                    f"{size_mib}M"], check=True, capture_output=True)


def our_leftovers(mountpoint: Path, state_dir: Path) -> dict:
    """What of a kvm-borg mount is still there: mounts, loop devices, FUSE/daemon processes."""
    mounts = [line.split()[4] for line in open("/proc/self/mountinfo")]
    mounts = [m for m in mounts if m.startswith(str(mountpoint)) or m.startswith(str(state_dir))]
    loops = json.loads(subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True).stdout or "{}")
    loops = [d["name"] for d in loops.get("loopdevices", []) if str(state_dir) in (d.get("back-file") or "")]
    processes = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if ("borg" in cmdline or "qemu-storage-daemon" in cmdline) and (
                    str(mountpoint) in cmdline or str(state_dir) in cmdline):
                processes.append(cmdline)
    return {"mounts": mounts, "loops": loops, "processes": processes}


@pytest.fixture
def ext4_domain(domain_factory, image_dir, tmp_path):
    """A running domain: vda raw with a partition table (ext4 partition 1, empty partition 2), vdb qcow2 whole-disk ext4."""
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 64, fill=None), DiskSpec("vdb", "qcow2", 32, fill=None)],
                                 running=False, name="mount ext4")
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text("restored-from-borg\n")
    make_ext4(domain.disks["vda"], content, offset=MiB, size_mib=40)
    write_mbr(domain.disks["vda"], [(2048, 40 * 2048), (42 * 2048, 20 * 2048)])
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("on the second disk\n")
    raw = tmp_path / "vdb.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 32 * MiB)
    make_ext4(raw, other, size_mib=32)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(domain.disks["vdb"])], check=True)
    domain.start()
    return domain


def test_mount_shows_files_of_the_archived_file_systems_and_umount_leaves_nothing(ext4_domain, image_dir, tmp_path):
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", ext4_domain.name, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    state_dir = image_dir / "kb" / "state"
    started = time.monotonic()
    proc = run_cli("mount", ext4_domain.name, mountpoint, "--json", config=config, env=cli_env())
    mount_seconds = time.monotonic() - started
    try:
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["filesystems"] == {
            "vda1": {"path": str(mountpoint / "vda1"), "type": "ext4"},
            "vdb": {"path": str(mountpoint / "vdb"), "type": "ext4"},
        }
        assert result["skipped"] == [{"partition": "vda2", "reason": "no mountable file system (none found)"}]
        assert (mountpoint / "vda1" / "etc" / "hostname").read_text() == "restored-from-borg\n"
        assert (mountpoint / "vdb" / "data.txt").read_text() == "on the second disk\n"
        assert os.path.getsize(result["images"]["vda"]) == 64 * MiB  # the image itself, in the archive mount
        assert result["images"]["vda"].startswith(str(mountpoint / "archive"))
        with pytest.raises(OSError) as excinfo:
            (mountpoint / "vda1" / "new-file").write_text("x")
        assert excinfo.value.errno == errno.EROFS
        print(f"mount took {mount_seconds:.1f}s")
    finally:
        proc = run_cli("umount", mountpoint, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert our_leftovers(mountpoint, state_dir) == {"mounts": [], "loops": [], "processes": []}
    assert list(mountpoint.iterdir()) == []
    assert list((state_dir / "mounts").iterdir()) == []


def test_umount_tears_down_after_a_crash_in_the_middle(ext4_domain, image_dir, tmp_path):
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    assert run_cli("backup", ext4_domain.name, config=config, env=cli_env()).returncode == 0
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    state_dir = image_dir / "kb" / "state"
    proc = run_cli("mount", ext4_domain.name, mountpoint, "--disk", "vdb", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert (mountpoint / "vdb" / "data.txt").exists() and not (mountpoint / "vda1").exists()
    # The daemon that serves the disk dies: the file system above it is left on a dead device.
    [daemon] = [p for p in our_leftovers(mountpoint, state_dir)["processes"] if "qemu-storage-daemon" in p]
    pid = int(Path(state_dir / "mounts").glob("*/vdb.pid").__next__().read_text())
    os.kill(pid, signal.SIGKILL)
    # A second mount on the same point is refused while the first is not torn down.
    proc = run_cli("mount", ext4_domain.name, mountpoint, config=config, env=cli_env())
    assert proc.returncode == 2 and "kvm-borg: error:" in proc.stderr
    proc = run_cli("umount", mountpoint, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert our_leftovers(mountpoint, state_dir) == {"mounts": [], "loops": [], "processes": []}
    assert list(mountpoint.iterdir()) == []
    proc = run_cli("umount", mountpoint, config=config, env=cli_env())
    assert proc.returncode == 2 and "nothing mounted" in proc.stderr


def test_mount_of_a_restic_archive_shows_its_files_and_umount_leaves_nothing(ext4_domain, image_dir, tmp_path):
    from support import write_passphrase

    config = write_config(image_dir / "kb", repositories=[{
        "name": "restic", "type": "restic", "url": str(tmp_path / "restic-repo"),
        "passphrase_file": str(write_passphrase(tmp_path / "restic-pass"))}])
    proc = run_cli("backup", ext4_domain.name, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    state_dir = image_dir / "kb" / "state"
    proc = run_cli("mount", ext4_domain.name, mountpoint, "--json", config=config, env=cli_env())
    try:
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert set(result["filesystems"]) == {"vda1", "vdb"}
        assert (mountpoint / "vda1" / "etc" / "hostname").read_text() == "restored-from-borg\n"
        assert (mountpoint / "vdb" / "data.txt").read_text() == "on the second disk\n"
        assert "/ids/" in result["images"]["vda"]  # served by `restic mount`
    finally:
        proc = run_cli("umount", mountpoint, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    leftovers = our_leftovers(mountpoint, state_dir)
    for entry in Path("/proc").iterdir():  # the restic FUSE process names the mount point
        try:
            if entry.name.isdigit() and str(mountpoint) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                leftovers["processes"].append(entry.name)
        except OSError:  # gone meanwhile
            continue
    assert leftovers == {"mounts": [], "loops": [], "processes": []}
    assert list(mountpoint.iterdir()) == []
