"""Per-domain locks so two kvm-borg runs never work on the same domain at once."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from kvm_borg.errors import LockedError


@contextlib.contextmanager
def domain_lock(lock_dir: Path, uuid: str, name: str):
    """Hold an exclusive, non-blocking flock for domain `uuid`; LockedError names the holder's PID.

    The kernel drops the lock when the process dies, so a killed run never leaves it behind."""
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = lock_dir / f"{uuid}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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
