"""Durable, atomic file writes that never follow a planted symlink.

Every state file kvm-borg writes (journal entries, run state, metrics, staging, records) goes
through `write_atomic`: a fresh temp file in the same directory opened with
O_CREAT|O_EXCL|O_NOFOLLOW (a file or symlink already at that name is never opened, let alone
truncated), the data fsync'd, renamed over the target (rename replaces a symlink at the target, it
does not follow it) and the directory fsync'd, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ATTEMPTS = 16


def temp_names(path: Path):
    """Given the target path, yield candidate temp paths in its directory: first the predictable
    `.<name>.<pid>.tmp`, then random ones (when a name is taken, by a crash leftover or a plant)."""
    yield path.with_name(f".{path.name}.{os.getpid()}.tmp")
    while True:
        yield path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or unlink in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, mode: int) -> None:
    os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> Path:
    """Given a path, the bytes and the final mode, replace the file atomically and durably; return
    the path. The temp file is created O_EXCL|O_NOFOLLOW in the same directory and removed on error."""
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
            _write_all(fd, data, mode)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def create_exclusive(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> Path:
    """Given a path that must not exist yet, create it with `data` and `mode` (O_EXCL|O_NOFOLLOW,
    fsync'd, directory fsync'd); FileExistsError when anything, a symlink included, is there."""
    path = Path(path)
    fd = os.open(path, _FLAGS, 0o600)
    try:
        _write_all(fd, data, mode)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    fsync_dir(path.parent)
    return path
