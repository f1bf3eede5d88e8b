"""`kvm-borg mount` / `umount`: file-level restore against real libvirtd + QEMU + borg."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from harness import DiskSpec, run_cli
from harness.crafted import Original, Tree, borg_original, craft_borg
from kvm_borg import mountinfo
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
    mountpoint.mkdir(mode=0o700)  # an existing MOUNTPOINT must be closed to other users
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
    mountpoint = tmp_path / "mnt"  # does not exist: kvm-borg creates it (0700) and umount removes it
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
    assert not mountpoint.exists()
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
    mountpoint.mkdir(mode=0o700)
    state_dir = image_dir / "kb" / "state"
    proc = run_cli("mount", ext4_domain.name, mountpoint, "--json", config=config, env=cli_env())
    try:
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert set(result["filesystems"]) == {"vda1", "vdb"}
        for path in (mountpoint / "archive", mountpoint / "vda1", mountpoint / "vdb"):
            entry = mountinfo.entry_at(str(path))
            assert {"ro", "nosuid", "nodev", "noexec"} <= entry.options, (path, entry)
        assert "allow_other" not in mountinfo.entry_at(str(mountpoint / "archive")).super_options
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


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def as_nobody(*argv) -> subprocess.CompletedProcess:
    """Run a command as the unprivileged user nobody; return the finished process (output captured)."""
    return subprocess.run(NOBODY + [str(a) for a in argv], capture_output=True, text=True, timeout=60)


HOST_SECRET = b"HOST-DISK-SECRET"


@pytest.fixture
def host_disk(tmp_path):
    """A block device of this host holding HOST_SECRET: a loop device (the sandbox's cgroup denies /dev/vda to
    everyone, so the disk under / cannot show the difference). Yields its (major, minor)."""
    backing = tmp_path / "host-disk.img"
    backing.write_bytes(HOST_SECRET + bytes(MiB - len(HOST_SECRET)))
    device = subprocess.run(["losetup", "--find", "--show", "--read-only", str(backing)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        rdev = os.stat(device).st_rdev
        yield os.major(rdev), os.minor(rdev)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


def plant_hostile_files(content: Path, host_disk: tuple[int, int]) -> None:
    """Fill a directory with what a hostile guest would leave for the host: a setuid-root binary, an
    executable, a /dev/null-like character device and a node of the host's disk `host_disk` (major, minor)."""
    (content / "bin").mkdir(parents=True)
    (content / "dev").mkdir()
    shutil.copy("/usr/bin/id", content / "bin" / "suid-id")
    os.chown(content / "bin" / "suid-id", 0, 0)
    os.chmod(content / "bin" / "suid-id", 0o4755)
    shutil.copy("/bin/true", content / "bin" / "tool")
    os.chmod(content / "bin" / "tool", 0o755)
    os.mknod(content / "dev" / "null-like", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(content / "dev" / "host-disk", 0o666 | stat.S_IFBLK, os.makedev(*host_disk))
    (content / "secret.txt").write_text("guest data\n")
    os.chmod(content / "secret.txt", 0o644)  # world-readable inside the guest


def exec_errno(path: Path) -> int | None:
    """Try to execute `path` as the current user; return the errno of the failure, or None if it ran."""
    try:
        subprocess.run([str(path)], capture_output=True, timeout=30)
    except OSError as exc:
        return exc.errno
    return None


def open_errno(path: Path) -> int | None:
    """Try to open `path` for reading; return the errno of the failure, or None if it opened."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as exc:
        return exc.errno
    return None


def test_mount_honours_no_setuid_device_node_or_exec_and_other_users_cannot_reach_it(domain_factory, image_dir,
                                                                                      tmp_path, host_disk):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 32, fill=None)], running=False, name="mount hostile")
    content = tmp_path / "content"
    plant_hostile_files(content, host_disk)
    make_ext4(domain.disks["vda"], content, size_mib=32)
    # The control: mounted with `ro` only (what kvm-borg did before), the planted files work.
    plain = tmp_path / "plain"
    plain.mkdir()
    subprocess.run(["mount", "-o", "ro,loop", str(domain.disks["vda"]), str(plain)], check=True)
    try:
        assert exec_errno(plain / "bin" / "tool") is None
        assert open_errno(plain / "dev" / "null-like") is None
        assert (plain / "dev" / "host-disk").read_bytes()[:len(HOST_SECRET)] == HOST_SECRET
    finally:
        subprocess.run(["umount", "-d", str(plain)], check=True)

    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", domain.name, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    state_dir = image_dir / "kb" / "state"
    assert as_nobody("stat", image_dir).returncode == 0  # nobody can reach the parent of the mount point

    # An existing MOUNTPOINT open to others is refused: one line, exit 2, nothing mounted.
    open_dir = image_dir / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    proc = run_cli("mount", domain.name, open_dir, config=config, env=cli_env())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "accessible by other users (mode 0755)" in proc.stderr
    assert list(open_dir.iterdir()) == [] and our_leftovers(open_dir, state_dir)["mounts"] == []

    # A dangling symlink is refused too: kvm-borg would create a directory wherever it points.
    (image_dir / "link").symlink_to(image_dir / "elsewhere")
    proc = run_cli("mount", domain.name, image_dir / "link", config=config, env=cli_env())
    assert proc.returncode == 2 and "is a symlink to a missing directory" in proc.stderr
    assert not (image_dir / "elsewhere").exists()

    mountpoint = image_dir / "mnt"  # kvm-borg creates it
    proc = run_cli("mount", domain.name, mountpoint, "--json", config=config, env=cli_env())
    try:
        assert proc.returncode == 0, proc.stderr
        fs = mountpoint / "vda"
        assert json.loads(proc.stdout)["filesystems"] == {"vda": {"path": str(fs), "type": "ext4"}}
        assert stat.S_IMODE(mountpoint.stat().st_mode) == 0o700
        # The planted files are there, as the guest made them...
        assert os.lstat(fs / "bin" / "suid-id").st_mode & stat.S_ISUID
        assert stat.S_ISCHR(os.lstat(fs / "dev" / "null-like").st_mode)
        assert os.lstat(fs / "dev" / "host-disk").st_rdev == os.makedev(*host_disk)
        assert (fs / "secret.txt").read_text() == "guest data\n"
        # ...and every mount kvm-borg made says ro,nosuid,nodev,noexec (the archive's FUSE mount too).
        for path in (fs, mountpoint / "archive"):
            entry = mountinfo.entry_at(str(path))
            assert entry is not None and {"ro", "nosuid", "nodev", "noexec"} <= entry.options, (path, entry)
        assert "allow_other" not in mountinfo.entry_at(str(mountpoint / "archive")).super_options
        # Even root cannot execute from it or open its device nodes.
        assert exec_errno(fs / "bin" / "suid-id") == errno.EACCES
        assert exec_errno(fs / "bin" / "tool") == errno.EACCES
        assert open_errno(fs / "dev" / "null-like") == errno.EACCES
        assert open_errno(fs / "dev" / "host-disk") == errno.EACCES
        # Another user cannot list the mount point, read a world-readable guest file or run the setuid binary.
        for argv in (("ls", mountpoint), ("ls", fs), ("cat", fs / "secret.txt"), (fs / "bin" / "suid-id",),
                     ("ls", mountpoint / "archive")):
            denied = as_nobody(*argv)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, (argv, denied)
    finally:
        proc = run_cli("umount", mountpoint, config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert our_leftovers(mountpoint, state_dir) == {"mounts": [], "loops": [], "processes": []}
    assert not mountpoint.exists()


def store_crafted_archive(repo: Path, original: Original, name: str, workdir: Path, edit) -> str:
    """Store a copy of `original` (a real kvm-borg archive, extracted once by `borg_original`) as
    archive `name`, its files changed by `edit(root, meta_path, meta)`, which returns the meta.json
    to write (harness.crafted does the rest)."""

    def edit_tree(tree: Tree) -> None:
        meta_path = tree.meta_path()
        meta_path.write_text(json.dumps(edit(tree.root, meta_path, tree.meta())))

    return craft_borg(repo, original.archive, edit_tree, workdir=workdir, name=name, original=original)


def host_secret_image(tmp_path: Path) -> Path:
    """Return a 16 MiB ext4 image holding a host "secret" (what a crafted archive would like to mount)."""
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "shadow").write_text("host secret\n")
    host_image = tmp_path / "host-fs.img"
    host_image.write_bytes(b"")
    os.truncate(host_image, 16 * MiB)
    make_ext4(host_image, secret_dir, size_mib=16)
    return host_image


def test_mount_refuses_hostile_archives_and_leaves_nothing_mounted(domain_factory, image_dir, tmp_path):
    """Archives edited by whoever can write the repository: each is refused (exit 2, one line) before
    anything of this host is opened, and the mount point is left as it was."""
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16, fill=None)], running=False, name="mount crafted")
    repo = tmp_path / "repo"
    config = write_config(image_dir / "kb", repo_path=repo)
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    original = json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]
    state_dir = image_dir / "kb" / "state"
    # A host file an attacker would like to see through the mount: an ext4 image with a secret.
    host_image = host_secret_image(tmp_path)
    host_data = tmp_path / "host-data.raw"

    def image_of(root, meta):
        return root / meta["disks"][0]["archive_path"]

    def symlink_to_host(root, _meta_path, meta):
        image_of(root, meta).unlink()
        image_of(root, meta).symlink_to(host_image)
        meta["disks"][0]["format"] = "raw"
        return meta

    def external_data_file(root, _meta_path, meta):
        image_of(root, meta).unlink()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={host_data},data_file_raw=on",
                        str(image_of(root, meta)), "16M"], check=True)
        return meta

    def format_(fmt):
        def edit(_root, _meta_path, meta):
            meta["disks"][0]["format"] = fmt
            return meta
        return edit

    def backing_outside(_root, _meta_path, meta):
        meta["disks"][0]["backing_chain"] = [{"path": "/etc/shadow", "archive_path": "../../../../etc/shadow",
                                              "format": "raw"}]
        return meta

    def backing_vmdk(root, _meta_path, meta):
        meta["disks"][0]["backing_chain"] = [{"path": "/x/base.vmdk", "archive_path": meta["disks"][0]["archive_path"],
                                              "format": "vmdk"}]
        return meta

    cases = {
        "symlink-to-host-file": (symlink_to_host, "is not a regular file in the archive"),
        "qcow2-external-data-file": (external_data_file, "asks for an external data file"),
        "format-vmdk": (format_("vmdk"), "is a vmdk image: kvm-borg mount opens only qcow2 and raw images"),
        "format-traversal": (format_("../../x"), "invalid image format"),
        "backing-outside-archive": (backing_outside, "outside the archive"),
        "backing-format-vmdk": (backing_vmdk, "is a vmdk image"),
    }
    mountpoint = image_dir / "mnt"
    mountpoint.mkdir(mode=0o700)
    failures = {}
    extracted = borg_original(repo, original, workdir=tmp_path / "original")
    for case, (edit, message) in cases.items():
        archive = store_crafted_archive(repo, extracted, f"crafted-{case}", tmp_path / "crafted", edit)
        proc = run_cli("mount", domain.name, mountpoint, "--archive", archive, config=config, env=cli_env())
        errors = [line for line in proc.stderr.splitlines() if line.startswith("kvm-borg: error:")]
        leftovers = our_leftovers(mountpoint, state_dir)
        if (proc.returncode != 2 or len(errors) != 1 or message not in errors[0] or "Traceback" in proc.stderr
                or list(mountpoint.iterdir()) or leftovers != {"mounts": [], "loops": [], "processes": []}
                or list((state_dir / "mounts").glob("*.json"))):
            failures[case] = (proc.returncode, proc.stderr[-600:], leftovers, list(mountpoint.iterdir()))
            run_cli("umount", mountpoint, config=config, env=cli_env())
    assert failures == {}
    # The untouched archive still mounts at the same place.
    proc = run_cli("mount", domain.name, mountpoint, "--archive", original, config=config, env=cli_env())
    try:
        assert proc.returncode == 0, proc.stderr
    finally:
        assert run_cli("umount", mountpoint, config=config, env=cli_env()).returncode == 0


def test_mount_of_a_restic_archive_whose_image_is_a_symlink_to_a_host_file_is_refused(domain_factory, image_dir,
                                                                                         tmp_path):
    """One crafted restic archive: a snapshot carrying a real archive's tags (another name) whose meta.json
    names an image that is a symlink to an ext4 image of this host. Refused, nothing of the host mounted."""
    from harness.cli import RESTIC_BIN, restic_env
    from kvm_borg.backends.restic import archives
    from support import write_passphrase

    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 16, fill=None)], running=False, name="mount crafted restic")
    repo = tmp_path / "restic-repo"
    config = write_config(image_dir / "kb", repositories=[{
        "name": "restic", "type": "restic", "url": str(repo),
        "passphrase_file": str(write_passphrase(tmp_path / "restic-pass"))}])
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    original = json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]

    def restic(*args):
        return subprocess.run([str(RESTIC_BIN), "-r", str(repo), *map(str, args)], env=restic_env(), check=True,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    [main] = [s for s in json.loads(restic("snapshots", "--json").stdout) if "part=main" in s["tags"]]
    host_image = host_secret_image(tmp_path)
    crafted = tmp_path / "crafted"
    restored = tmp_path / "restored"
    restic("restore", main["id"], "--target", restored, "--include", "/**/meta.json")
    [meta_file] = list(restored.rglob("meta.json"))
    meta = json.loads(meta_file.read_text())
    crafted.mkdir()
    (crafted / "disk.img").symlink_to(host_image)
    meta["disks"][0]["archive_path"] = str(crafted / "disk.img").lstrip("/")
    (crafted / "meta.json").write_text(json.dumps(meta))
    name = "crafted-restic-symlink"
    tags = [t for t in main["tags"] if not t.startswith("archive=")] + [archives.tag("archive", name)]
    restic("backup", "--host", main["hostname"], *[arg for t in tags for arg in ("--tag", t)], crafted)

    mountpoint = image_dir / "mnt"
    state_dir = image_dir / "kb" / "state"
    proc = run_cli("mount", domain.name, mountpoint, "--archive", name, config=config, env=cli_env())
    try:
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("kvm-borg: error:")]
        assert len(errors) == 1 and "is not a regular file in the archive" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        if (state_dir / "mounts").is_dir() and list((state_dir / "mounts").glob("*.json")):
            run_cli("umount", mountpoint, config=config, env=cli_env())
    assert our_leftovers(mountpoint, state_dir) == {"mounts": [], "loops": [], "processes": []}
    assert not mountpoint.exists()
    # The real archive of the same repository mounts.
    proc = run_cli("mount", domain.name, mountpoint, "--archive", original, config=config, env=cli_env())
    try:
        assert proc.returncode == 0, proc.stderr
    finally:
        assert run_cli("umount", mountpoint, config=config, env=cli_env()).returncode == 0
