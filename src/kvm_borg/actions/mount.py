"""`kvm-borg mount` / `kvm-borg umount`: file-level restore from an archive.

    MOUNTPOINT/archive/   the archive itself, read-only (borg mount / restic mount)
    MOUNTPOINT/images/    a flat read-only `<target>.raw` per segmented disk (bitmap method)
    MOUNTPOINT/vda/       a disk's file system when the disk has no partition table
    MOUNTPOINT/vda1/ ...  the file systems of its partitions, read-only

A segmented disk (archive layout "segments") is a directory of segment files in the archive: a
segment view of kind `files` (kvm_borg.segment_view, its own FUSE process, read-only, no
allow_other) stitches them into one raw image at MOUNTPOINT/images/<target>.raw, which is then
exported and mounted like an image (format raw: the segments hold the guest content).

How a disk image inside the archive becomes a block device without the kernel's nbd module
(this host's kernel has none, and no partition-table parsers either): qemu-storage-daemon
opens the image from the FUSE mount read-only, puts a throwaway qcow2 overlay in kvm-borg's
state directory on top (a crash-consistent ext4/xfs needs its journal replayed: the replay
lands in the overlay, never in the archive) and exports the overlay as a raw file through its
own FUSE export. `partx` reads the partition table from that file; one loop device per
partition (offset + size) is mounted `-o ro,nosuid,nodev,noexec` (xfs also `nouuid`).

What the archive holds is untrusted (a guest, or whoever can write the repository, made it):
- No file system kvm-borg mounts honours setuid bits, device nodes or exec; the archive's FUSE
  mount gets the same flags (a bind remount) and no `allow_other`. MOUNTPOINT must be owned by
  the caller and closed to others (0700; kvm-borg creates it so when it does not exist), and
  every directory kvm-borg creates in it is 0700: other local users cannot even list it, so
  guest file owners (uids that may exist on this host too) grant nothing here.
- The journal of a crash-consistent file system is replayed (no `norecovery`/`noload`): the
  replay lands in the throwaway overlay, and without it a live backup's file system would show
  stale or inconsistent metadata.
- Every image layer is opened with the format meta.json names (validated, raw or qcow2 only),
  never probed; every qcow2 layer's backing is given explicitly, and a qcow2 layer that asks for
  an external data file is refused, so no host path written in an image header is ever opened.

Each step is recorded in a state file (state_dir/mounts/) before the next one starts, so
`umount` tears everything down in reverse order, also after a failure or a crash half-way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import time
from pathlib import Path

from kvm_borg import archive_meta, mountinfo, restore_plan, signals
from kvm_borg.pipeline.backup import prepare_state_dir
from kvm_borg.actions.common import Context, open_repository, print_json
from kvm_borg.atomic import write_atomic
from kvm_borg.errors import KvmBorgError, RefusedError, UsageError
from kvm_borg.pipeline import archive as archive_reading
from kvm_borg.tools import first_line, run_tool, tool_output

log = logging.getLogger(__name__)

ARCHIVE_DIR = "archive"
IMAGES_DIR = "images"  # the segment view of the segmented disks
SECTOR = 512
# File systems mounted; anything else (swap, LVM, LUKS, an extended partition) is listed as skipped.
MOUNTABLE = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "exfat", "ntfs", "ntfs3", "iso9660"})
# Flags of every mount kvm-borg makes (file systems and the archive's FUSE mount).
SAFE_FLAGS = ("ro", "nosuid", "nodev", "noexec")
# Image formats mount opens: both are opened with every child node named, nothing from the header.
MOUNT_FORMATS = frozenset({"raw", "qcow2"})
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_EXTERNAL_DATA_FILE = 1 << 2  # incompatible feature bit 2
PROCESS_EXIT_SECONDS = 10.0


# --- pure helpers ------------------------------------------------------------------------------


def parse_partx(output: str) -> list[tuple[int, int, int]]:
    """Given `partx --show --noheadings -o NR,START,SECTORS` output, return [(number, start, sectors)]."""
    parts = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            parts.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return parts


def mount_options(fs_type: str) -> str:
    """Given a file system type, return its mount options: read-only, no setuid, no devices, no exec
    (xfs also nouuid: the original may be mounted on this host)."""
    return ",".join(SAFE_FLAGS + (("nouuid",) if fs_type == "xfs" else ()))


def check_mount_format(fmt: str, what: str) -> str:
    """Given a (validated) image format from meta.json, return it if mount can open it safely; else a UsageError."""
    fmt = archive_meta.check_format(fmt)
    if fmt not in MOUNT_FORMATS:
        raise UsageError(f"{what} is a {fmt} image: kvm-borg mount opens only "
                         f"{' and '.join(sorted(MOUNT_FORMATS))} images (use kvm-borg restore)")
    return fmt


def qcow2_header_problem(header: bytes) -> str | None:
    """Given the first 80 bytes of an image read as qcow2, return why it must not be opened, or None.

    Refused: not a qcow2 header at all, and version 3 headers with the external data file bit
    (the data file's path comes from the image and would be opened on the host)."""
    if len(header) < 72 or header[:4] != QCOW2_MAGIC:
        return "is not a qcow2 image"
    version = int.from_bytes(header[4:8], "big")
    if version >= 3:
        if len(header) < 80:
            return "has a truncated qcow2 header"
        if int.from_bytes(header[72:80], "big") & QCOW2_EXTERNAL_DATA_FILE:
            return "asks for an external data file (refused: its path comes from the image)"
    return None


def check_mount_point(mountpoint: str, *, uid: int, exists: bool, mode: int = 0, owner: int = 0,
                      is_dir: bool = True, empty: bool = True) -> None:
    """Given a resolved MOUNTPOINT and what stat says about it, raise a UsageError/RefusedError if kvm-borg
    must not mount there: not a directory, not empty, owned by another user, or open to group/others."""
    if not exists:
        return
    if not is_dir:
        raise UsageError(f"{mountpoint} is not a directory")
    if owner != uid:
        raise UsageError(f"{mountpoint} is owned by uid {owner}, not by you: give a directory of your own")
    if mode & 0o077:
        raise UsageError(f"{mountpoint} is accessible by other users (mode {mode & 0o7777:04o}): chmod 700 it, "
                         "or name a directory that does not exist yet (kvm-borg creates it 0700)")
    if not empty:
        raise RefusedError(f"{mountpoint} is not empty")


def blockdev_options(image: str, fmt: str, overlay: str, backing: list[tuple[str, str]]) -> list[str]:
    """Given an image in the archive mount, its format, the overlay file and backing layers [(path, format)],
    return qemu-storage-daemon --blockdev JSON arguments: the archive's files read-only, the overlay on top.

    Every layer's `backing` is explicit, so no path written in an image header is ever opened."""
    layers = [(image, fmt)] + backing
    args = []
    for index, (path, layer_format) in reversed(list(enumerate(layers))):
        args.append(json.dumps({"driver": "file", "node-name": f"f{index}", "filename": path, "read-only": True}))
        node = {"driver": layer_format, "node-name": f"l{index}", "file": f"f{index}", "read-only": True}
        if layer_format == "qcow2":
            node["backing"] = f"l{index + 1}" if index + 1 < len(layers) else None
        args.append(json.dumps(node))
    args.append(json.dumps({"driver": "file", "node-name": "of", "filename": overlay}))
    args.append(json.dumps({"driver": "qcow2", "node-name": "overlay", "file": "of", "backing": "l0"}))
    return args


def state_file(state_dir: Path, mountpoint: str) -> Path:
    """Given the state dir and a mount point, return the file that records what is mounted there."""
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return state_dir / "mounts" / f"{digest}.json"


# --- running tools -----------------------------------------------------------------------------


def mounted_paths() -> set[str]:
    """Return every mount point of this mount namespace (escapes decoded, see kvm_borg.mountinfo)."""
    return mountinfo.mount_points()


def _pid_alive(pid: int, needle: str) -> bool:
    """Given a pid and a string its command line must contain, return whether that process still runs."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return False
    return needle in cmdline


def _find_process(needle: str, program: str) -> int | None:
    """Return the pid of a process whose command line mentions `program` and contains `needle`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _pid_alive(int(entry.name), needle) and _pid_alive(int(entry.name), program):
            return int(entry.name)
    return None


def _stop_process(pid: int, needle: str) -> None:
    """SIGTERM a process of ours (identified by `needle` in its command line), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _pid_alive(pid, needle):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + PROCESS_EXIT_SECONDS
        while time.monotonic() < deadline and _pid_alive(pid, needle):
            time.sleep(0.1)
    if _pid_alive(pid, needle):
        raise KvmBorgError(f"process {pid} does not exit")


def _umount(path: str, *, lazy_fallback: bool = False) -> None:
    if path not in mounted_paths():
        return
    proc = run_tool(["umount", path], what=f"unmount {path}", ok_codes=None)
    if proc.returncode != 0 and lazy_fallback:
        proc = run_tool(["umount", "-l", path], what=f"unmount {path}", ok_codes=None)
    if proc.returncode != 0 and path in mounted_paths():
        raise KvmBorgError(f"cannot unmount {path}: {first_line(proc.stderr) or 'umount failed'}")


def _loop_backing(device: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


# --- the record of what is mounted ------------------------------------------------------------


class MountRecord:
    """The state file of one mount point: every step appended and saved before the next starts."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data

    @classmethod
    def create(cls, path: Path, mountpoint: str, workdir: str) -> "MountRecord":
        record = cls(path, {"mountpoint": mountpoint, "workdir": workdir, "steps": [], "complete": False})
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        record.save()
        return record

    @classmethod
    def load(cls, path: Path) -> "MountRecord | None":
        try:
            return cls(path, json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except ValueError:
            raise KvmBorgError(f"mount state file {path} is unreadable") from None

    def add(self, **step) -> None:
        self.data["steps"].append(step)
        self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2, ensure_ascii=False).encode("utf-8"), 0o600)


def teardown(ctx: Context, record: MountRecord) -> list[str]:
    """Given a MountRecord, undo its steps in reverse order; return the problems left (empty: all gone)."""
    problems = []
    for step in reversed(record.data["steps"]):
        try:
            _undo(ctx, step)
        except KvmBorgError as exc:
            problems.append(str(exc))
    if not problems:
        shutil.rmtree(record.data["workdir"], ignore_errors=True)
        record.path.unlink(missing_ok=True)
    else:
        record.data["steps"] = [s for s in record.data["steps"] if not s.get("undone")]
        record.save()
    return problems


def _undo(ctx: Context, step: dict) -> None:
    kind = step["kind"]
    if kind == "fs":
        _umount(step["path"])
        _rmdir(step["path"])
    elif kind == "loop":
        if _loop_backing(step["device"]) == step["file"]:
            tool_output(["losetup", "-d", step["device"]], what=f"detach {step['device']}")
    elif kind == "qsd":
        pid = step.get("pid")
        if pid:
            _stop_process(pid, step["export"])
        _umount(step["export"], lazy_fallback=True)  # left behind if the daemon died
    elif kind == "archive":
        if step["path"] in mounted_paths():
            try:
                _repo, backend = open_repository(ctx, step["repository"])
                backend.unmount(step["path"])
            except KvmBorgError as exc:
                log.warning("%s; unmounting lazily", exc)
        _umount(step["path"], lazy_fallback=True)
        if step.get("pid"):
            _stop_process(step["pid"], step["path"])
        _rmdir(step["path"])
    elif kind == "view":
        from kvm_borg.segment_view import control as view_control  # only where an archive has segmented disks

        view_control.stop_leftover(step["path"], step.get("pid"))
        _rmdir(step["path"])
    elif kind == "dir":
        _rmdir(step["path"])
    step["undone"] = True


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KvmBorgError(f"cannot remove {path}: {exc.strerror}") from None


# --- mount -------------------------------------------------------------------------------------


def run_mount(ctx: Context, domain: str, mountpoint: str, *, archive: str | None = None, repo: str | None = None,
              disks: list[str] | None = None) -> dict:
    """Given a domain, an empty directory and options, mount the archive's images and their file systems; return what is where."""
    if os.path.islink(mountpoint) and not os.path.exists(mountpoint):  # kvm-borg would create its target
        raise UsageError(f"{mountpoint} is a symlink to a missing directory: give the real path")
    mountpoint = os.path.realpath(mountpoint)
    try:
        st = os.lstat(mountpoint)
    except FileNotFoundError:
        st = None
        if not os.path.isdir(os.path.dirname(mountpoint)):
            raise UsageError(f"{mountpoint}: its parent directory does not exist") from None
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    check_mount_point(mountpoint, uid=os.geteuid(), exists=st is not None, mode=st.st_mode if st else 0,
                      owner=st.st_uid if st else 0, is_dir=is_dir, empty=not (is_dir and os.listdir(mountpoint)))
    prepare_state_dir(ctx.settings)
    path = state_file(ctx.settings.state_dir, mountpoint)
    if path.exists():
        raise RefusedError(f"kvm-borg already mounted something at {mountpoint}; run `kvm-borg umount {mountpoint}`")
    repository, backend = open_repository(ctx, repo)
    archive = archive_reading.choose(backend, ctx.settings, domain, archive, None).name
    meta, entries = archive_reading.read_archive(backend, archive, domain)
    plan = restore_plan.plan_restore(meta, frozenset(entries), target_dir="/", disks=disks or (), with_xml=False)
    for disk in plan.disks:  # before anything is mounted: a refused format changes nothing
        if disk.segmented:
            continue  # read as raw guest content through the segment view
        check_mount_format(disk.format, f"disk {disk.target}")
        for layer, layer_format in disk.backing:
            check_mount_format(layer_format, f"backing file {layer.archive_path} of disk {disk.target}")
    workdir = str(path.with_suffix(""))
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    record = MountRecord.create(path, mountpoint, workdir)
    record.data.update(domain=domain, archive=archive, repository=repository["name"])
    result = {"domain": domain, "archive": archive, "repository": repository["name"], "mountpoint": mountpoint,
              "images": {}, "filesystems": {}, "skipped": []}
    try:
        if st is None:  # created here, so removed by umount
            os.mkdir(mountpoint, 0o700)
            record.add(kind="dir", path=mountpoint)
        archive_dir = os.path.join(mountpoint, ARCHIVE_DIR)
        os.mkdir(archive_dir, 0o700)
        record.add(kind="archive", path=archive_dir, repository=repository["name"], pid=None)
        root = backend.mount(archive, archive_dir)
        record.data["steps"][-1]["pid"] = _find_process(archive_dir, " mount ")
        record.save()
        _restrict_mount(archive_dir)
        flat = _segment_view(record, mountpoint, workdir, root, [d for d in plan.disks if d.segmented])
        for disk in plan.disks:
            if disk.segmented:
                image, fmt, backing = flat[disk.target], "raw", []
            else:
                image, fmt = _archive_image(root, disk.image.archive_path, disk.format, f"disk {disk.target}"), disk.format
                backing = [(_archive_image(root, layer.archive_path, layer_format,
                                           f"backing file {layer.archive_path} of disk {disk.target}"), layer_format)
                           for layer, layer_format in disk.backing]
            result["images"][disk.target] = image
            export = _export_disk(record, workdir, disk.target, image, fmt, backing)
            for name, fs_path, fs_type, reason in _mount_filesystems(record, mountpoint, disk.target, export):
                if fs_path:
                    result["filesystems"][name] = {"path": fs_path, "type": fs_type}
                else:
                    result["skipped"].append({"partition": name, "reason": reason})
        record.data["complete"] = True
        record.save()
    except BaseException:
        problems = teardown(ctx, record)
        for problem in problems:
            log.error("cleanup after the failed mount: %s (run `kvm-borg umount %s`)", problem, mountpoint)
        raise
    return result


def _restrict_mount(path: str) -> None:
    """Given the archive's FUSE mount point, make it read-only, nosuid, nodev, noexec (a bind remount:
    only the mount's flags change, whatever options the backend's FUSE process used)."""
    tool_output(["mount", "-o", "remount,bind," + ",".join(SAFE_FLAGS), path], what=f"restrict the mount at {path}")
    entry = mountinfo.entry_at(path)
    if entry is None or not set(SAFE_FLAGS) <= entry.options:
        raise KvmBorgError(f"the archive mount at {path} is not {','.join(SAFE_FLAGS)} after the remount")


def _archive_image(root: str, archive_path: str, fmt: str, what: str) -> str:
    """Given the archive's root in its FUSE mount, a validated archive path and format, return the host path of
    that image if it is a regular file inside the archive (no symlink anywhere) whose header may be opened;
    otherwise a KvmBorgError."""
    path = os.path.join(root, archive_path)
    try:
        st = os.lstat(path)
    except OSError:
        raise KvmBorgError(f"{what}: {archive_path} is not in the mounted archive") from None
    if not stat.S_ISREG(st.st_mode) or os.path.realpath(path) != os.path.normpath(path):
        raise KvmBorgError(f"{what}: {archive_path} is not a regular file in the archive (refused)")
    if fmt == "qcow2":
        with open(path, "rb") as handle:
            problem = qcow2_header_problem(handle.read(80))
        if problem:
            raise KvmBorgError(f"{what}: {archive_path} {problem}")
    return path


def _segment_view(record: MountRecord, mountpoint: str, workdir: str, root: str, disks: list) -> dict[str, str]:
    """Given the archive's root in its FUSE mount and its segmented RestoreDisks, serve them as flat read-only
    images at MOUNTPOINT/images/<target>.raw (one `files` segment view for all of them); return {target: image}.
    Each segment directory must be a real directory inside the archive (no symlink on the way); the view
    itself checks every segment file before it mounts (KvmBorgError naming the first that does not fit)."""
    if not disks:
        return {}
    from kvm_borg.segment_view import control as view_control  # only where an archive has segmented disks
    from kvm_borg.segment_view.spec import FilesDisk, ViewSpec

    files = []
    for disk in disks:
        directory = os.path.join(root, disk.image.archive_path)
        try:
            st = os.lstat(directory)
        except OSError:
            raise KvmBorgError(f"disk {disk.target}: {disk.image.archive_path} is not in the mounted archive") from None
        if not stat.S_ISDIR(st.st_mode) or os.path.realpath(directory) != os.path.normpath(directory):
            raise KvmBorgError(f"disk {disk.target}: {disk.image.archive_path} is not a directory in the archive "
                               "(refused)")
        files.append(FilesDisk(disk.target, directory, disk.virtual_size, disk.segment_size))
    images_dir = os.path.join(mountpoint, IMAGES_DIR)
    os.mkdir(images_dir, 0o700)
    record.add(kind="view", path=images_dir, pid=None)
    view_dir = os.path.join(workdir, "view")
    os.makedirs(view_dir, mode=0o700, exist_ok=True)
    process = view_control.start_view(ViewSpec("files", images_dir, tuple(files)), os.path.join(view_dir, "spec.json"),
                                      outlive_parent=True)
    record.data["steps"][-1]["pid"] = process.pid
    record.save()
    return {disk.target: os.path.join(images_dir, f"{disk.target}.raw") for disk in disks}


def _export_disk(record: MountRecord, workdir: str, target: str, image: str, fmt: str,
                 backing: list[tuple[str, str]]) -> str:
    """Given a disk image in the archive mount, export it (with a throwaway overlay) as a raw FUSE file; return its path."""
    overlay = os.path.join(workdir, f"{target}.overlay.qcow2")
    export = os.path.join(workdir, f"{target}.raw")
    pidfile = os.path.join(workdir, f"{target}.pid")
    size = json.loads(tool_output(["qemu-img", "info", "--output=json", "-f", fmt, image],
                                  what=f"read {image}"))["virtual-size"]
    tool_output(["qemu-img", "create", "-q", "-f", "qcow2", overlay, str(size)], what=f"create the overlay of {target}")
    Path(export).touch(mode=0o600)
    record.add(kind="qsd", export=export, pid=None)
    argv = ["qemu-storage-daemon", "--daemonize", "--pidfile", pidfile]
    for option in blockdev_options(image, fmt, overlay, backing):
        argv += ["--blockdev", option]
    argv += ["--export", json.dumps({"type": "fuse", "id": "export", "node-name": "overlay", "mountpoint": export,
                                     "writable": True})]
    try:
        tool_output(argv, what=f"export disk {target}")
    finally:
        try:
            record.data["steps"][-1]["pid"] = int(Path(pidfile).read_text().strip())
            record.save()
        except (OSError, ValueError):
            pass
    return export


def _mount_filesystems(record: MountRecord, mountpoint: str, target: str, export: str):
    """Given an exported disk, mount each partition's (or the whole disk's) file system; yield (name, path, type, reason)."""
    proc = run_tool(["partx", "--show", "--noheadings", "-o", "NR,START,SECTORS", export],
                    what=f"read the partition table of {target}", ok_codes=None)
    parts = parse_partx(proc.stdout) if proc.returncode == 0 else []
    if parts:
        pieces = [(f"{target}{number}", start * SECTOR, sectors * SECTOR) for number, start, sectors in parts]
    else:
        pieces = [(target, 0, os.path.getsize(export))]
    for name, offset, size in pieces:
        device = tool_output(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size),
                              export], what=f"attach a loop device to {name}").strip()
        record.add(kind="loop", device=device, file=export)
        fs_type = run_tool(["blkid", "-p", "-o", "value", "-s", "TYPE", device], what=f"probe {device}",
                           ok_codes=None).stdout.strip()
        if fs_type not in MOUNTABLE:
            tool_output(["losetup", "-d", device], what=f"detach {device}")
            record.data["steps"].pop()
            record.save()
            yield name, None, fs_type or None, f"no mountable file system ({fs_type or 'none found'})"
            continue
        path = os.path.join(mountpoint, name)
        os.mkdir(path, 0o700)
        record.add(kind="dir", path=path)
        tool_output(["mount", "-t", fs_type, "-o", mount_options(fs_type), device, path],
                    what=f"mount {name} ({fs_type})")
        record.data["steps"][-1] = {"kind": "fs", "path": path}
        record.save()
        yield name, path, fs_type, None


def run_umount(ctx: Context, mountpoint: str) -> list[str]:
    """Given a mount point, tear down everything kvm-borg mounted there; a leftover is a KvmBorgError."""
    record = MountRecord.load(state_file(ctx.settings.state_dir, mountpoint))
    if record is None:
        raise UsageError(f"kvm-borg has nothing mounted at {os.path.realpath(mountpoint)}")
    problems = teardown(ctx, record)
    if problems:
        raise KvmBorgError(f"{mountpoint} is not fully unmounted: {problems[0]}")
    return []


# --- the commands ------------------------------------------------------------------------------


def mount_from_args(ctx: Context, args) -> int:
    with signals.interruptible():  # a SIGTERM half-way still tears down what was mounted
        try:
            result = run_mount(ctx, args.domain, args.mountpoint, archive=args.archive, repo=args.repo,
                               disks=args.disk)
        except OSError as exc:  # after the teardown of what was mounted
            raise KvmBorgError(f"mount failed: {exc.filename or ''}: {exc.strerror or exc}") from None
    if args.json:
        print_json(result)
        return 0
    print(f"{result['domain']}: {result['archive']} mounted at {result['mountpoint']}")
    for target, image in result["images"].items():
        print(f"  {target}: image {image}")
    for name, fs in result["filesystems"].items():
        print(f"  {name}: {fs['type']} at {fs['path']}")
    for skipped in result["skipped"]:
        print(f"  {skipped['partition']}: not mounted: {skipped['reason']}")
    print(f"  undo with: kvm-borg umount {result['mountpoint']}")
    return 0


def umount_from_args(ctx: Context, args) -> int:
    run_umount(ctx, args.mountpoint)
    return 0
