"""Writing restored files: each stored file streamed from the archive into a temporary name beside its
destination (kvm_borg.atomic.replace_streamed), sparse where it is an image, with an owner and mode
chosen on this host, and renamed into place; or written into a block device as it is. Backing chains
are rebased onto the restored layers (`qemu-img rebase -u`).

Missing directories are created 0711 (QEMU must traverse them, nobody may list them).
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

from kvm_borg.atomic import replace_streamed, write_all
from kvm_borg.models import RepositoryBackend
from kvm_borg.restore_plan import RestoreDisk
from kvm_borg.sparse import SparseWriter
from kvm_borg.tools import run_tool


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
    """Given an archive, a stored path and its destination, stream the file into a temporary name beside the
    destination (holes left for zero blocks when `sparse`), give it its local owner and mode, fsync it and
    rename it into place; return its size in bytes."""
    make_dirs(posixpath.dirname(destination))
    uid, gid, mode = local_owner(destination)

    def fill(fd: int) -> int:
        if not sparse:
            backend.stream_file(archive, archive_path, lambda data: write_all(fd, data))
            return os.lseek(fd, 0, os.SEEK_CUR)
        writer = SparseWriter(fd)
        backend.stream_file(archive, archive_path, writer.write)
        return writer.close()

    return replace_streamed(destination, fill, mode, owner=(uid, gid))


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
