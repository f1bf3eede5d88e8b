"""Throwaway file systems for tests: a small tmpfs that is always unmounted again."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def tmpfs(point: str | os.PathLike, size: str, *options: str) -> Iterator[Path]:
    """Given a mount point (created if missing), a size ("4m") and mount options ("mode=0755",
    "nosuid"...), mount a tmpfs there and yield the point as a Path; unmount it on leaving, lazily
    (`umount -l`) when something still holds it open (a QEMU of a failed test). An unmount that
    fails even so raises AssertionError."""
    point = Path(point)
    point.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs", point],
                   check=True, capture_output=True)
    try:
        yield point
    finally:
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            lazy = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
            assert lazy.returncode == 0, f"umount -l {point}: {lazy.stderr}"
