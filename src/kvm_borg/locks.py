"""Per-domain locks so two kvm-borg runs never work on the same domain at once.

The locks live in one host-wide directory, /run/kvm-borg/locks/, keyed by the domain UUID, so two
configurations with different state_dirs still exclude each other (a domain has one set of disks
whatever config names it). /run is a tmpfs: the files vanish at boot, when no run can hold them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from kvm_borg.errors import KvmBorgError, LockedError

LOCK_DIR = Path("/run/kvm-borg/locks")


def canonical_uuid(text: str) -> str:
    """Given a UUID's text, return it as `str(uuid.UUID(text))` does (lower-case, hyphenated), raising what
    uuid.UUID raises for anything else; parsed as uuid.UUID parses it, without importing uuid (which
    imports platform: ~4 ms of every start-up)."""
    if text is None:
        raise TypeError("one of the hex, bytes, bytes_le, fields, or int arguments must be given")
    digits = text.replace("urn:", "").replace("uuid:", "").strip("{}").replace("-", "")
    if len(digits) != 32:
        raise ValueError("badly formed hexadecimal UUID string")
    value = f"{int(digits, 16):032x}"
    return f"{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}"


def lock_name(uuid: str) -> str:
    """Given a domain UUID, return its lock file's name (`<uuid>.lock`); anything that is not a UUID
    is a KvmBorgError (the UUID becomes part of a path)."""
    try:
        canonical = canonical_uuid(uuid)
    except (ValueError, TypeError, AttributeError):
        raise KvmBorgError(f"cannot lock domain: {uuid!r} is not a UUID") from None
    return f"{canonical}.lock"


def _private_dir(path: Path) -> None:
    """Create `path` (0700) if missing; refuse a symlink, a non-directory or a directory owned by
    someone else, and tighten a looser mode of our own."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise KvmBorgError(f"lock directory {path} is not a directory (a symlink?); remove it")
    if info.st_uid != os.geteuid():
        raise KvmBorgError(f"lock directory {path} is owned by uid {info.st_uid}, not by us; remove it")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def ensure_lock_dir(lock_dir: Path) -> None:
    """Create `lock_dir` and its parent as private (0700) directories of ours."""
    _private_dir(lock_dir.parent)
    _private_dir(lock_dir)


@contextlib.contextmanager
def domain_lock(lock_dir: Path, uuid: str, name: str):
    """Hold an exclusive, non-blocking flock for domain `uuid` in `lock_dir` (normally LOCK_DIR);
    LockedError names the holder's PID. Yields the lock file's path.

    The kernel drops the lock when the process dies, so a killed run never leaves it behind."""
    ensure_lock_dir(lock_dir)
    path = lock_dir / lock_name(uuid)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(
                f"domain {name!r} is being handled by another kvm-borg run (pid {holder}); try again later"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)
