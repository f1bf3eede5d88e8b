"""Reading /proc/self/mountinfo: the one parser every kvm-borg module uses.

The kernel writes each mount as one line (proc(5)):

    36 35 98:0 /root /mnt/point rw,nosuid master:1 - ext4 /dev/loop0 ro,errors=continue

and escapes space, tab, newline and backslash in the path fields as 3-digit octal (`\\040`,
`\\011`, `\\012`, `\\134`). Paths are bytes in any encoding; they are decoded like every other
file name (os.fsdecode), so a mount point that is not UTF-8 still compares equal to the path
os.listdir() returns.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo: where, what, and the per-mount and per-superblock options."""

    mount_point: str
    fs_type: str
    source: str
    options: frozenset[str]  # per-mount options (ro, nosuid, nodev, noexec, relatime...)
    super_options: frozenset[str]  # the file system's own options (errors=..., user_id=...)


def unescape(field: bytes) -> str:
    """Given one mountinfo field as bytes, return it with the kernel's octal escapes decoded (os.fsdecode'd)."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


def parse_line(line: bytes) -> MountEntry | None:
    """Given one mountinfo line, return its MountEntry, or None if the line is not a mount line."""
    fields = line.rstrip(b"\n").split(b" ")
    try:
        separator = fields.index(b"-", 6)
    except ValueError:
        return None
    if len(fields) < separator + 3:
        return None
    return MountEntry(
        mount_point=unescape(fields[4]),
        fs_type=unescape(fields[separator + 1]),
        source=unescape(fields[separator + 2]),
        options=frozenset(os.fsdecode(fields[5]).split(",")),
        super_options=frozenset(os.fsdecode(fields[separator + 3]).split(",")) if len(fields) > separator + 3
        else frozenset(),
    )


def parse(data: bytes) -> list[MountEntry]:
    """Given the bytes of a mountinfo file, return its MountEntries in file order (malformed lines skipped)."""
    return [entry for entry in map(parse_line, data.splitlines()) if entry is not None]


def read(path: str = MOUNTINFO) -> list[MountEntry]:
    """Return the MountEntries of this process's mount namespace (or of the mountinfo file at `path`)."""
    with open(path, "rb") as handle:
        return parse(handle.read())


def mount_points(path: str = MOUNTINFO) -> set[str]:
    """Return every mount point of this process's mount namespace, escapes decoded."""
    return {entry.mount_point for entry in read(path)}


def entry_at(mount_point: str, path: str = MOUNTINFO) -> MountEntry | None:
    """Given a path, return the topmost mount on it (the last line naming it), or None if nothing is mounted there."""
    found = None
    for entry in read(path):
        if entry.mount_point == mount_point:
            found = entry
    return found
