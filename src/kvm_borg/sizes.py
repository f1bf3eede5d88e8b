"""How many bytes a reader of a host path gets: the one size function that works for files and block devices."""

from __future__ import annotations

import os


def content_size(path: str) -> int:
    """Given a host path (a regular file or a block device, or a link to one, or a directory such as a
    segmented disk's), return the bytes reading it yields: a file's length, a block device's size (whose
    `st_size` is 0, hence the seek to the end), the sum of the regular files below a directory (links not
    followed). An unreadable path is an OSError."""
    if os.path.isdir(path):
        return directory_size(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def directory_size(path: str) -> int:
    """Given a directory, return the sum of the sizes of the regular files below it (links not followed)."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                total += directory_size(entry.path)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total
