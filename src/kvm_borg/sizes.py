"""How many bytes a reader of a host path gets: the one size function that works for files and block devices."""

from __future__ import annotations

import os


def content_size(path: str) -> int:
    """Given a host path (a regular file or a block device, or a link to one), return the bytes reading it
    yields: a file's length, a block device's size (whose `st_size` is 0, hence the seek to the end).
    An unreadable path is an OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
