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
import stat
from pathlib import Path

from kvm_borg import archive_meta, restore_plan, signals
from kvm_borg.pipeline.backup import prepare_state_dir
from kvm_borg.actions.common import Context, open_repository, print_json
from kvm_borg.errors import KvmBorgError, RefusedError, UsageError
from kvm_borg.pipeline import archive as archive_reading
from kvm_borg.pipeline import archive_mount
from kvm_borg.pipeline.archive_mount import SAFE_FLAGS, MountRecord, qcow2_header_problem  # noqa: F401 (tests)
from kvm_borg.tools import run_tool, tool_output

log = logging.getLogger(__name__)

ARCHIVE_DIR = "archive"
IMAGES_DIR = "images"  # the segment view of the segmented disks
SECTOR = 512
# File systems mounted; anything else (swap, LVM, LUKS, an extended partition) is listed as skipped.
MOUNTABLE = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "exfat", "ntfs", "ntfs3", "iso9660"})
# Image formats mount opens: both are opened with every child node named, nothing from the header.
MOUNT_FORMATS = frozenset({"raw", "qcow2"})


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
        root = archive_mount.mount_archive(record, backend, repository["name"], archive,
                                           os.path.join(mountpoint, ARCHIVE_DIR))
        flat = archive_mount.segment_view(record, os.path.join(mountpoint, IMAGES_DIR), workdir, root,
                                          [d for d in plan.disks if d.segmented])
        for disk in plan.disks:
            if disk.segmented:
                image, fmt, backing = flat[disk.target], "raw", []
            else:
                image, fmt = archive_mount.archive_image(root, disk.image.archive_path, disk.format, f"disk {disk.target}"), disk.format
                backing = [(archive_mount.archive_image(root, layer.archive_path, layer_format,
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


def teardown(ctx: Context, record: MountRecord) -> list[str]:
    """Given a MountRecord, undo its steps in reverse order; return the problems left (empty: all gone)."""
    return archive_mount.teardown(record, lambda repository, path: open_repository(ctx, repository)[1].unmount(path))


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
