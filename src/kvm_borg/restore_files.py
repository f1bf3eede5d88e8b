"""Writing restored files: an image written by the backend's own tool into a private directory beside its
destination (borg extract --sparse: `replace_extracted`), checked, holes dug, or streamed from the archive
into a temporary name beside it (kvm_borg.atomic.replace_streamed; restic, small files), sparse where it
is an image, with an owner and mode chosen on this host, and renamed into place; or written into a block device as it is. Backing chains
are rebased onto the restored layers (`qemu-img rebase -u`). A segmented disk (layout "segments") is
read segment by segment (kvm_borg.pipeline.segments_read) into the temporary file, raw and sparse,
and a qcow2 original is converted there (`qemu-img convert -f raw -O qcow2 -o compat=1.1`, from a
second, sparse temporary file) before the rename: the restored disk is flat, in its original format.

Missing directories are created 0711 (QEMU must traverse them, nobody may list them).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import stat
import tempfile
from pathlib import Path

from kvm_borg.atomic import fsync_dir, replace_streamed, temp_names, write_all
from kvm_borg.errors import UsageError
from kvm_borg.models import RepositoryBackend
from kvm_borg.pipeline.segments_read import DenseOutput, SparseFileOutput, read_segments
from kvm_borg.restore_plan import RestoreDisk
from kvm_borg.sparse import SparseWriter, dig_holes
from kvm_borg.tools import run_tool

log = logging.getLogger(__name__)

COPY_CHUNK = 4 << 20
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def local_owner(destination: str) -> tuple[int, int, int]:
    """Given a destination, return (uid, gid, mode) for the restored file, chosen on this host: those of the
    regular file it replaces (without setuid/setgid/sticky, execute or world-write bits), else root's 0600."""
    try:
        st = os.lstat(destination)
    except FileNotFoundError:
        return 0, 0, 0o600
    if not stat.S_ISREG(st.st_mode):
        return 0, 0, 0o600
    return st.st_uid, st.st_gid, (stat.S_IMODE(st.st_mode) & 0o664) | 0o600


def make_dirs(path: str) -> None:
    """Given a directory path, create its missing directories with mode 0711."""
    missing = []
    current = Path(path)
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o711)
        os.chmod(directory, 0o711)


def restore_file(backend: RepositoryBackend, archive: str, archive_path: str, destination: str, *,
                 sparse: bool = True) -> int:
    """Given an archive, a stored path and its destination, write the file into a temporary name beside the
    destination (holes left for zero blocks when `sparse`), give it its local owner and mode, fsync it and
    rename it into place; return its size in bytes.

    An image (`sparse`) is written by the backend's own tool where it can (`extract_into`: borg extract
    into a private directory beside the destination, checked, holes dug where it wrote zero blocks),
    else streamed through kvm-borg's sparse writer (`stream_file`: restic dump)."""
    make_dirs(posixpath.dirname(destination))
    uid, gid, mode = local_owner(destination)
    if sparse:
        size = replace_extracted(backend, archive, archive_path, destination, mode, (uid, gid))
        if size is not None:
            return size

    def fill(fd: int) -> int:
        if not sparse:
            backend.stream_file(archive, archive_path, lambda data: write_all(fd, data))
            return os.lseek(fd, 0, os.SEEK_CUR)
        writer = SparseWriter(fd)
        backend.stream_file(archive, archive_path, writer.write)
        return writer.close()

    return replace_streamed(destination, fill, mode, owner=(uid, gid))


def extraction_parts(archive_path: str) -> list[str]:
    """Given a stored path (already checked by archive_meta.check_archive_path), return its components, the
    path a backend writes below its private directory; one that is absolute, empty or climbs with `.`/`..`
    is a UsageError (a second guard: nothing may be written outside that directory)."""
    parts = archive_path.split("/")
    if not archive_path or archive_path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"stored path {archive_path!r} is not a plain relative path; refused")
    return parts


def open_extracted(workdir: str, archive_path: str) -> tuple[int, int]:
    """Given a private directory and the stored path a backend extracted below it, return (fd of the directory
    holding the file, fd of the file, read-write). Each directory on the way is opened O_NOFOLLOW|O_DIRECTORY
    and the file, once lstat says it is a regular file, O_NOFOLLOW: a symlink anywhere, a missing file, or
    anything but a regular file with one link (a device, a FIFO, a hard link) is a UsageError naming the
    path; nothing is followed, no device opened."""
    parts = extraction_parts(archive_path)
    directory = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            os.close(directory)
            directory = inner
        seen = os.stat(parts[-1], dir_fd=directory, follow_symlinks=False)
        if not stat.S_ISREG(seen.st_mode):  # never opened: a device or FIFO is not even touched
            raise UsageError(f"{archive_path} was not extracted as a regular file; refused")
        fd = os.open(parts[-1], os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=directory)
    except OSError as exc:
        os.close(directory)
        raise UsageError(f"{archive_path} was not extracted as a regular file ({exc.strerror}); refused") from None
    except UsageError:
        os.close(directory)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        os.close(directory)
        raise UsageError(f"{archive_path} was not extracted as a regular file; refused")
    return directory, fd


def replace_extracted(backend: RepositoryBackend, archive: str, archive_path: str, destination: str, mode: int,
                      owner: tuple[int, int]) -> int | None:
    """Given an archive, a stored regular file, its destination and the local mode and owner, let the backend
    write the file into a private directory beside the destination (`extract_into`), check what it wrote
    (open_extracted), dig holes where it wrote zero blocks, give it `owner` and `mode`, fsync it and rename
    it onto the destination (the directory fsync'd); return its size, or None when the backend cannot
    (nothing written: the caller streams). The private directory is removed whatever happens."""
    parent = posixpath.dirname(destination)
    workdir = tempfile.mkdtemp(prefix=f".{posixpath.basename(destination)}.kvm-borg-", dir=parent)  # 0700
    try:
        if not backend.extract_into(archive, archive_path, workdir):
            return None
        directory, fd = open_extracted(workdir, archive_path)
        try:
            try:
                dig_holes(fd)  # borg leaves only all-zero chunks as holes; kvm-borg's restores hole every zero block
            except OSError as exc:  # only space: the data is right, borg's own holes stay
                log.warning("cannot dig holes in %s: %s", destination, exc.strerror or exc)
            os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # exactly `mode`, whatever the archive recorded
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        try:
            os.replace(posixpath.basename(archive_path), destination, src_dir_fd=directory)
        finally:
            os.close(directory)
        fsync_dir(Path(parent))
        return size
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def convert_argv(raw: str, target: str) -> list[str]:
    """Given a raw image and where its qcow2 copy goes, return the `qemu-img convert` argv (sparse: zero
    clusters are not allocated; compat=1.1, i.e. qcow2 v3)."""
    return ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", raw, target]


def restore_segmented(backend: RepositoryBackend, archive: str, disk: RestoreDisk, destination: str) -> int:
    """Given an archive, a segmented RestoreDisk and its destination file, write the disk's raw content into a
    temporary file beside the destination (sparse), convert it when the disk's format is qcow2, give it its
    local owner and mode, fsync it and rename it into place; return the virtual size in bytes.

    A hostile or broken segment directory is a UsageError and leaves nothing at the destination."""
    make_dirs(posixpath.dirname(destination))
    uid, gid, mode = local_owner(destination)

    def fill_raw(fd: int) -> int:
        read_segments(backend, archive, disk, SparseFileOutput(fd, disk.virtual_size))
        return disk.virtual_size

    def fill_converted(fd: int) -> int:
        raw = _create_temp(f"{destination}.raw")
        try:
            raw_fd = os.open(raw, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fill_raw(raw_fd)
            finally:
                os.close(raw_fd)
            # qemu-img writes the qcow2 into the very temp file replace_streamed opened (inherited fd)
            run_tool(convert_argv(raw, f"/dev/fd/{fd}"), what=f"convert disk {disk.target} to qcow2", timeout=None,
                     pass_fds=(fd,))
        finally:
            os.unlink(raw)
        return disk.virtual_size

    return replace_streamed(destination, fill_converted if disk.format == "qcow2" else fill_raw, mode,
                            owner=(uid, gid))


def _create_temp(near: str) -> str:
    """Given a path, create an empty 0600 temporary file beside it (O_EXCL|O_NOFOLLOW); return its path."""
    for _attempt, temp in zip(range(16), temp_names(Path(near))):
        try:
            os.close(os.open(temp, _TEMP_FLAGS, 0o600))
        except FileExistsError:
            continue
        return str(temp)
    raise FileExistsError(f"no free temporary name beside {near}")


def write_segmented_into_device(backend: RepositoryBackend, archive: str, disk: RestoreDisk, device: str) -> int:
    """Given a raw segmented RestoreDisk and a block device, write the disk's raw content into the device from
    offset 0 (every byte, zeros too) and fsync it; return the bytes written."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        read = read_segments(backend, archive, disk, DenseOutput(fd))
        os.fsync(fd)
    finally:
        os.close(fd)
    return read.bytes_written


def stream_segmented(backend: RepositoryBackend, archive: str, disk: RestoreDisk, write, scratch_dir: str) -> int:
    """Given a segmented RestoreDisk, a `write` callable (stdout) and a private directory, pass the disk's raw
    content to `write` in order; return the bytes passed.

    The segments come in the archive's order (borg: by inode, i.e. scrambled), so they are first written
    into an unnamed sparse temporary file in `scratch_dir` (O_TMPFILE: gone with the process), then read
    out in order (the system's temporary directory when `scratch_dir` does not exist, e.g. on a new host)."""
    with tempfile.TemporaryFile(dir=scratch_dir if os.path.isdir(scratch_dir) else None) as handle:
        read_segments(backend, archive, disk, SparseFileOutput(handle.fileno(), disk.virtual_size))
        passed = 0
        while data := os.pread(handle.fileno(), COPY_CHUNK, passed):
            write(data)
            passed += len(data)
    return passed


def write_text(path: str, text: str) -> None:
    """Given a path and a text, write it atomically, 0600, creating missing directories 0711."""
    make_dirs(posixpath.dirname(path))
    replace_streamed(path, lambda fd: write_all(fd, text.encode("utf-8")), 0o600)


def write_into_device(backend: RepositoryBackend, archive: str, archive_path: str, device: str) -> int:
    """Given a block device, write one stored file into it from offset 0 (O_WRONLY: no truncate, no rename,
    every byte written, zeros too) and fsync it; return the bytes written."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    written = 0
    try:
        def write(data: bytes) -> None:
            nonlocal written
            write_all(fd, data)
            written += len(data)
        backend.stream_file(archive, archive_path, write)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def block_device_size(path: str) -> int:
    """Given a block device, return its size in bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def rebase_argv(upper: str, upper_format: str, lower: str, lower_format: str) -> list[str]:
    """Given a restored layer and the restored layer below it, with their formats, return the `qemu-img rebase
    -u` argv that points the upper at the lower (-f/-F given: nothing is probed from the data)."""
    return ["qemu-img", "rebase", "-u", "-f", upper_format, "-b", lower, "-F", lower_format, upper]


def rebase_chain(disk: RestoreDisk) -> None:
    """Given a restored disk with backing files, point each layer at the restored layer below it, with the
    formats meta.json records."""
    layers = [(disk.image.destination, disk.format)] + [(f.destination, fmt) for f, fmt in disk.backing]
    for (upper, upper_format), (lower, lower_format) in zip(layers, layers[1:]):
        run_tool(rebase_argv(upper, upper_format, lower, lower_format), what=f"rebase {upper}")
