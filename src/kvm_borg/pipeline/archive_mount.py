"""An archive exposed read-only on this host, step by recorded step, and its teardown.

Used by `kvm-borg mount` (file-level restore) and by the live restore (QEMU reads the archived
images as backing files while the data is pulled). The steps:

    the backend's FUSE mount of the archive (borg mount / restic mount), made read-only,
    nosuid, nodev and noexec by a bind remount
    one `files` segment view (kvm_borg.segment_view) that stitches each segmented disk's
    segment files into one flat raw image

Each step is appended to a MountRecord (a JSON state file) before the next one starts, so
`teardown` undoes everything in reverse order, also after a failure or a crash half-way; the
record also holds the steps `kvm-borg mount` adds on top (storage daemons, loop devices, file
systems). What the archive holds is untrusted: every image must be a regular file inside the
archive (no symlink on the way), every segment directory a real directory, and a qcow2 header
that asks for an external data file is refused.

With `shared`, other users may read what is exposed (QEMU runs as its own user): the backend's
mount and the view use allow_other and do not check permissions, so the caller must keep the
directory above them closed to everybody but root and QEMU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

from kvm_borg import mountinfo
from kvm_borg.atomic import write_atomic
from kvm_borg.errors import KvmBorgError
from kvm_borg.tools import first_line, run_tool, tool_output

log = logging.getLogger(__name__)

# Flags of every mount kvm-borg makes (file systems and the archive's FUSE mount).
SAFE_FLAGS = ("ro", "nosuid", "nodev", "noexec")
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_EXTERNAL_DATA_FILE = 1 << 2  # incompatible feature bit 2
PROCESS_EXIT_SECONDS = 10.0

# Given (repository name, path): unmount an archive a backend mounted there (the caller opens the backend).
UnmountArchive = Callable[[str, str], None]


# --- pure helpers ------------------------------------------------------------------------------


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


# --- running tools -----------------------------------------------------------------------------


def mounted_paths() -> set[str]:
    """Return every mount point of this mount namespace (escapes decoded, see kvm_borg.mountinfo)."""
    return mountinfo.mount_points()


def pid_alive(pid: int, needle: str) -> bool:
    """Given a pid and a string its command line must contain, return whether that process still runs."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return False
    return needle in cmdline


def find_process(needle: str, program: str) -> int | None:
    """Return the pid of a process whose command line mentions `program` and contains `needle`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name), needle) and pid_alive(int(entry.name), program):
            return int(entry.name)
    return None


def stop_process(pid: int, needle: str) -> None:
    """SIGTERM a process of ours (identified by `needle` in its command line), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid_alive(pid, needle):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + PROCESS_EXIT_SECONDS
        while time.monotonic() < deadline and pid_alive(pid, needle):
            time.sleep(0.1)
    if pid_alive(pid, needle):
        raise KvmBorgError(f"process {pid} does not exit")


def umount(path: str, *, lazy_fallback: bool = False) -> None:
    """Given a path, unmount what is mounted there (nothing if nothing is); lazily if asked and needed."""
    if path not in mounted_paths():
        return
    proc = run_tool(["umount", path], what=f"unmount {path}", ok_codes=None)
    if proc.returncode != 0 and lazy_fallback:
        proc = run_tool(["umount", "-l", path], what=f"unmount {path}", ok_codes=None)
    if proc.returncode != 0 and path in mounted_paths():
        raise KvmBorgError(f"cannot unmount {path}: {first_line(proc.stderr) or 'umount failed'}")


def rmdir(path: str) -> None:
    """Remove an empty directory (nothing if it is gone); a KvmBorgError if it cannot be removed."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KvmBorgError(f"cannot remove {path}: {exc.strerror}") from None


def _loop_backing(device: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


# --- the record of what is mounted ------------------------------------------------------------


class MountRecord:
    """The state file of one exposure: every step appended and saved before the next starts."""

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


def teardown(record: MountRecord, unmount_archive: UnmountArchive) -> list[str]:
    """Given a MountRecord and how to unmount a backend's archive mount, undo its steps in reverse order;
    return the problems left (empty: all gone, the record and its workdir removed)."""
    problems = []
    for step in reversed(record.data["steps"]):
        try:
            _undo(step, unmount_archive)
        except KvmBorgError as exc:
            problems.append(str(exc))
    if not problems:
        shutil.rmtree(record.data["workdir"], ignore_errors=True)
        record.path.unlink(missing_ok=True)
    else:
        record.data["steps"] = [s for s in record.data["steps"] if not s.get("undone")]
        record.save()
    return problems


def _undo(step: dict, unmount_archive: UnmountArchive) -> None:
    kind = step["kind"]
    if kind == "fs":
        umount(step["path"])
        rmdir(step["path"])
    elif kind == "loop":
        if _loop_backing(step["device"]) == step["file"]:
            tool_output(["losetup", "-d", step["device"]], what=f"detach {step['device']}")
    elif kind == "qsd":
        pid = step.get("pid")
        if pid:
            stop_process(pid, step["export"])
        umount(step["export"], lazy_fallback=True)  # left behind if the daemon died
    elif kind == "archive":
        if step["path"] in mounted_paths():
            try:
                unmount_archive(step["repository"], step["path"])
            except KvmBorgError as exc:
                log.warning("%s; unmounting lazily", exc)
        umount(step["path"], lazy_fallback=True)
        if step.get("pid"):
            stop_process(step["pid"], step["path"])
        rmdir(step["path"])
    elif kind == "view":
        from kvm_borg.segment_view import control as view_control  # only where an archive has segmented disks

        view_control.stop_leftover(step["path"], step.get("pid"))
        rmdir(step["path"])
    elif kind == "dir":
        rmdir(step["path"])
    step["undone"] = True


# --- exposing ----------------------------------------------------------------------------------


def mount_archive(record: MountRecord, backend, repository: str, archive: str, path: str, *,
                  shared: bool = False) -> str:
    """Given the record, a backend (its repository's name), an archive and a directory to create, mount the
    archive there read-only, nosuid, nodev, noexec (`shared`: readable by other users); return the
    directory of the archive's root."""
    os.mkdir(path, 0o700 if not shared else 0o755)
    record.add(kind="archive", path=path, repository=repository, pid=None)
    root = backend.mount(archive, path, shared=shared) if shared else backend.mount(archive, path)
    record.data["steps"][-1]["pid"] = find_process(path, " mount ")
    record.save()
    restrict_mount(path)
    return root


def restrict_mount(path: str) -> None:
    """Given the archive's FUSE mount point, make it read-only, nosuid, nodev, noexec (a bind remount:
    only the mount's flags change, whatever options the backend's FUSE process used)."""
    tool_output(["mount", "-o", "remount,bind," + ",".join(SAFE_FLAGS), path], what=f"restrict the mount at {path}")
    entry = mountinfo.entry_at(path)
    if entry is None or not set(SAFE_FLAGS) <= entry.options:
        raise KvmBorgError(f"the archive mount at {path} is not {','.join(SAFE_FLAGS)} after the remount")


def archive_image(root: str, archive_path: str, fmt: str, what: str) -> str:
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


def segment_view(record: MountRecord, images_dir: str, workdir: str, root: str, disks: list, *,
                 shared: bool = False) -> dict[str, str]:
    """Given the archive's root in its FUSE mount and its segmented RestoreDisks, serve them as flat read-only
    images at IMAGES_DIR/<target>.raw (one `files` segment view for all of them; `shared`: readable by other
    users); return {target: image}. Each segment directory must be a real directory inside the archive (no
    symlink on the way); the view itself checks every segment file before it mounts (KvmBorgError naming
    the first that does not fit)."""
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
    os.mkdir(images_dir, 0o700 if not shared else 0o755)
    record.add(kind="view", path=images_dir, pid=None)
    view_dir = os.path.join(workdir, "view")
    os.makedirs(view_dir, mode=0o700, exist_ok=True)
    process = view_control.start_view(ViewSpec("files", images_dir, tuple(files), allow_other=shared),
                                      os.path.join(view_dir, "spec.json"), outlive_parent=True)
    record.data["steps"][-1]["pid"] = process.pid
    record.save()
    return {disk.target: os.path.join(images_dir, f"{disk.target}.raw") for disk in disks}
