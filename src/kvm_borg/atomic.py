"""Durable, atomic file writes that never follow a planted symlink.

Every state file kvm-borg writes (journal entries, run state, metrics, staging, records) goes
through `write_atomic`, and every file restore writes through `replace_streamed`, its streaming
form: a fresh temp file in the same directory opened with O_CREAT|O_EXCL|O_NOFOLLOW (a file or symlink already at that name is never opened, let alone
truncated), the data fsync'd, renamed over the target (rename replaces a symlink at the target, it
does not follow it) and the directory fsync'd, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ATTEMPTS = 16
T = TypeVar("T")


def temp_names(path: Path):
    """Given the target path, yield candidate temp paths in its directory: first the predictable
    `.<name>.<pid>.tmp`, then random ones (when a name is taken, by a crash leftover or a plant)."""
    yield path.with_name(f".{path.name}.{os.getpid()}.tmp")
    while True:  # os.urandom(n).hex() is secrets.token_hex(n), without importing secrets (hashlib, random)
        yield path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or unlink in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_streamed(path: str | os.PathLike, fill: Callable[[int], T], mode: int = 0o600,
                     owner: tuple[int, int] | None = None, *, durable: bool = True) -> T:
    """Given a path, a function that writes the new content into an open fd (and returns anything), the final
    mode and (uid, gid) owner (None: the caller's), replace the file atomically and durably; return what
    `fill` returned.

    The temp file beside `path` is created O_EXCL|O_NOFOLLOW and 0600, filled, given its owner and mode,
    fsync'd and renamed over `path` (the directory fsync'd too); on any error it is removed. With
    `durable=False` neither fsync is made (still atomic for every reader, but a crash may lose it): for files
    nothing reads after a crash, such as a backup's staging files."""
    path = Path(path)
    for _attempt, temp in zip(range(_ATTEMPTS), temp_names(path)):
        try:
            fd = os.open(temp, _FLAGS, 0o600)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"no free temporary name for {path}")
    try:
        try:
            result = fill(fd)
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
    return result


def write_all(fd: int, data: bytes) -> None:
    """Given an open fd and bytes, write all of them (os.write may write fewer at a time)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600, *, durable: bool = True) -> Path:
    """Given a path, the bytes and the final mode, replace the file atomically and (unless `durable=False`)
    durably (replace_streamed); return the path."""
    replace_streamed(path, lambda fd: write_all(fd, data), mode, durable=durable)
    return Path(path)


def create_exclusive(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> Path:
    """Given a path that must not exist yet, create it with `data` and `mode` (O_EXCL|O_NOFOLLOW,
    fsync'd, directory fsync'd); FileExistsError when anything, a symlink included, is there."""
    path = Path(path)
    fd = os.open(path, _FLAGS, 0o600)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    fsync_dir(path.parent)
    return path
