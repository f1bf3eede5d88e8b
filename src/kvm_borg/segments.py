"""Segment math of the bitmap method: a disk shown as fixed-size segment files, and which of them
changed, read as zeros or keep what the last run stored.

Pure: every function takes numbers, extents and the previous per-disk state and returns new ones,
without I/O (the new chain number is drawn from `secrets` unless the caller gives one). The state
file that keeps a `DiskSegments` between runs is `segment_state.py`; the view that serves segment
files is `segment_view/`.

A segment's attributes in the view are `st_ino = segment_inode(chain, disk_index, index)`,
`st_mtime_ns = st_ctime_ns = stamps[index]` and `st_size = 0` when it reads as zeros, else its
length: a (segment, stamp) pair names exactly one content, so a repository whose files cache or
parent snapshot holds other attributes re-reads the segment.
"""

from __future__ import annotations

import secrets
from array import array
from dataclasses import dataclass, field
from typing import Iterable

MANIFEST_VERSION = 1
NAME_DIGITS = 8
NBD_STATE_ZERO = 2  # base:allocation flag: the extent reads as zeros
CHAIN_LIMIT = 2**32  # a chain is a random 32-bit number
# Segment inodes live in [SEGMENT_INODE_BASE, 2**62): everything below is the view's own (root, disk
# directories, manifest.json). Their fields, high to low: 17 bits of the chain, the disk's position,
# the segment's index, so that a disk's inodes ascend with its segments: borg walks a directory in
# inode order (borg.helpers.fs.scandir_inorder), so it reads the export and stores the segments in
# disk order, and a restore writes them in that order.
SEGMENT_INODE_BASE = 2**61
_INDEX_BITS = 34  # 2**34 segments of 64 KiB = 1 PiB (of the default 4 MiB: 64 PiB)
_DISK_BITS = 10  # 1024 disks per domain
_CHAIN_BITS = 17
_CHAIN_SHIFT = _INDEX_BITS + _DISK_BITS
CHAIN_INODE_MASK = (1 << _CHAIN_BITS) - 1  # the bits of a chain that its segments' inodes carry


def segment_count(virtual_size: int, size: int) -> int:
    """Given a disk's virtual size and the segment size (bytes, > 0), return how many segments cover it
    (the last one may be shorter); 0 for an empty disk."""
    if size <= 0 or virtual_size < 0:
        raise ValueError(f"bad geometry: virtual size {virtual_size}, segment size {size}")
    return -(-virtual_size // size)


def segment_length(index: int, virtual_size: int, size: int) -> int:
    """Given a segment's index, the disk's virtual size and the segment size, return the segment's length
    in bytes: `size`, or what is left for the last one. An index outside the disk is a ValueError."""
    count = segment_count(virtual_size, size)
    if not 0 <= index < count:
        raise ValueError(f"segment {index} is outside a disk of {count} segments")
    return min(size, virtual_size - index * size)


def name_width(count: int) -> int:
    """Given the segment count, return the digits of a segment name: 8, more only past 10**8 segments."""
    return max(NAME_DIGITS, len(str(max(count - 1, 0))))


def segment_name(index: int, count: int) -> str:
    """Given a segment's index and the disk's segment count, return its file name (`00000042`)."""
    if not 0 <= index < count:
        raise ValueError(f"segment {index} is outside a disk of {count} segments")
    return f"{index:0{name_width(count)}d}"


def parse_segment_name(name: str, count: int) -> int | None:
    """Given a file name read from an archive or a view and the disk's segment count, return the segment
    index it names, or None when it is not exactly the name `segment_name` gives a segment of that disk
    (other width, sign, spaces, non-ASCII digits, index past the end)."""
    if len(name) != name_width(count) or not name.isascii() or not name.isdigit():
        return None
    index = int(name)
    return index if index < count else None


def _clip(extents: Iterable[tuple[int, int, object]], size: int, count: int):
    """Yield (first, last) segment indices touched by each extent whose third item is true, clipped
    to the disk's `count` segments; empty extents and extents past the end yield nothing."""
    end = count * size
    for offset, length, flag in extents:
        if not flag or length <= 0 or offset >= end:
            continue
        if offset < 0:
            raise ValueError(f"extent at negative offset {offset}")
        yield offset // size, (min(offset + length, end) - 1) // size


def dirty_segments(extents: Iterable[tuple[int, int, bool]], size: int, count: int) -> set[int]:
    """Given dirty-bitmap extents [(offset, length, dirty)], the segment size and count, return the
    indices of the segments that any dirty byte falls in (extents beyond the disk's end are ignored)."""
    dirty: set[int] = set()
    for first, last in _clip(extents, size, count):
        dirty.update(range(first, last + 1))
    return dirty


def zero_segments(alloc_extents: Iterable[tuple[int, int, int]], size: int, count: int,
                  virtual_size: int) -> set[int]:
    """Given `base:allocation` extents [(offset, length, flags)] in ascending order, the segment size,
    count and the disk's virtual size, return the indices of the segments whose every byte lies in an
    extent with the NBD_STATE_ZERO flag (adjacent zero extents join; a gap or any other extent inside
    a segment makes it not zero)."""
    if count != segment_count(virtual_size, size):
        raise ValueError(f"{count} segments do not cover {virtual_size} bytes in segments of {size}")
    zero: set[int] = set()

    def add_run(start: int, stop: int) -> None:
        first = -(-start // size)  # the first segment that starts inside the run
        zero.update(range(first, min(stop // size, count - 1)))  # segments before the last end at a multiple
        if stop >= virtual_size and (count - 1) * size >= start:
            zero.add(count - 1)  # the last segment (maybe shorter) ends at virtual_size

    run_start = run_stop = None
    previous_end = 0
    for offset, length, flags in alloc_extents:
        if length <= 0:
            continue
        if offset < previous_end:
            raise ValueError(f"extents out of order at offset {offset}")
        previous_end = offset + length
        if not flags & NBD_STATE_ZERO:
            if run_start is not None:
                add_run(run_start, run_stop)
            run_start = None
        elif run_start is not None and offset == run_stop:
            run_stop = previous_end
        else:
            if run_start is not None:
                add_run(run_start, run_stop)
            run_start, run_stop = offset, previous_end
    if run_start is not None:
        add_run(run_start, run_stop)
    return zero


def segment_inode(chain: int, disk_index: int, index: int) -> int:
    """Given a disk's chain, its position in the domain and a segment's index, return the segment's inode
    number in the view: in [SEGMENT_INODE_BASE, 2**62) (so 1 < ino < 2**63), unique across the disks and
    segments of a domain whatever their chains, ascending with `index`, and different for the same
    (disk_index, index) in any chain whose low 17 bits differ (new_chain draws such a one)."""
    if not 0 <= chain < CHAIN_LIMIT or not 0 <= disk_index < 2**_DISK_BITS or not 0 <= index < 2**_INDEX_BITS:
        raise ValueError(f"no inode for chain {chain}, disk {disk_index}, segment {index}")
    return SEGMENT_INODE_BASE | (chain & CHAIN_INODE_MASK) << _CHAIN_SHIFT | disk_index << _INDEX_BITS | index


def new_chain(previous: int | None = None) -> int:
    """Given the chain a disk had (or None), return a fresh random 32-bit chain that gives every one of
    its segments another inode than `previous` did."""
    while True:
        chain = secrets.randbits(32)
        if previous is None or (chain ^ previous) & CHAIN_INODE_MASK:
            return chain


@dataclass
class DiskSegments:
    """One disk's segments as the last fold left them: its geometry, its chain and per segment the stamp
    (ns) of the run in which it last changed and whether it reads as zeros (1) or not (0).

    `image` is the active image's identity ({"path", "dev", "ino"}); `layers` the identity of every
    image layer ([[dev, ino, size, ctime_ns], ...], segment_state.layer_identity) after an offline
    run, else None."""

    target: str
    virtual_size: int
    segment_size: int
    count: int
    chain: int
    stamps: array = field(repr=False)  # array('Q'), one per segment
    zero: bytearray = field(repr=False)  # one byte per segment: 1 = reads as zeros
    format: str = "qcow2"
    image: dict | None = None
    layers: list | None = None

    def __post_init__(self) -> None:
        if self.count != segment_count(self.virtual_size, self.segment_size):
            raise ValueError(f"{self.target}: {self.count} segments do not cover {self.virtual_size} bytes "
                             f"in segments of {self.segment_size}")
        if self.stamps.typecode != "Q" or len(self.stamps) != self.count or len(self.zero) != self.count:
            raise ValueError(f"{self.target}: stamps and zero flags must hold {self.count} entries")
        if not 0 <= self.chain < CHAIN_LIMIT:
            raise ValueError(f"{self.target}: chain {self.chain} is not a 32-bit number")

    def max_stamp(self) -> int:
        """Return the newest stamp of any segment (0 for a disk without segments)."""
        return max(self.stamps, default=0)

    def length(self, index: int) -> int:
        """Given a segment index, return its length in bytes."""
        return segment_length(index, self.virtual_size, self.segment_size)

    def is_zero(self, index: int) -> bool:
        """Given a segment index, return whether it reads as zeros (its file is 0 bytes)."""
        return bool(self.zero[index])

    def file_size(self, index: int) -> int:
        """Given a segment index, return its file's size in the view and the archive: 0 when it reads as
        zeros, else its length."""
        return 0 if self.zero[index] else self.length(index)


def full_read_reason(previous: DiskSegments | None, *, virtual_size: int, segment_size: int, format: str,
                     image: dict | None = None) -> str | None:
    """Given the disk's previous state (or None) and what it is now (virtual size, segment size, format,
    active image identity {"path", "dev", "ino"} or None when unknown), return why its segments must be
    read in full this run whatever the bitmap says, or None when the previous state still describes it."""
    if previous is None:
        return "no previous state for this disk"
    if previous.virtual_size != virtual_size:
        return f"virtual size changed from {previous.virtual_size} to {virtual_size}"
    if previous.segment_size != segment_size:
        return f"segment size changed from {previous.segment_size} to {segment_size}"
    if previous.format != format:
        return f"format changed from {previous.format} to {format}"
    if image is not None and previous.image is not None and previous.image != image:
        return f"image replaced ({previous.image.get('path')} is another file)"
    return None


def plan_disk(previous: DiskSegments | None, *, dirty: set[int] | None, zero: set[int], stamp: int,
              target: str, virtual_size: int, segment_size: int, format: str = "qcow2",
              image: dict | None = None, layers: list | None = None, chain: int | None = None) -> DiskSegments:
    """Given the disk's previous state (None: none), the segments the bitmap calls dirty (None: read every
    segment, a full read), the segments reading as zeros now, this run's stamp (ns, greater than every
    stamp in `previous`), the disk's geometry and identity, return its new state: dirty segments get
    `stamp` and their zero flag from `zero`, clean ones keep theirs. A full read starts a new chain
    (`chain`, else a random one different from the previous chain); an incremental plan needs a
    previous state of the same geometry (see full_read_reason) and keeps its chain."""
    count = segment_count(virtual_size, segment_size)
    if previous is not None and stamp <= previous.max_stamp():
        raise ValueError(f"{target}: stamp {stamp} is not newer than the stamps already stored")
    if stamp <= 0 or stamp >= 2**64:
        raise ValueError(f"{target}: stamp {stamp} is not a positive 64-bit number")
    for name, indices in (("dirty", dirty or ()), ("zero", zero)):
        if indices and (min(indices) < 0 or max(indices) >= count):
            raise ValueError(f"{target}: {name} segment outside a disk of {count} segments")
    if dirty is None:
        return DiskSegments(target, virtual_size, segment_size, count,
                            new_chain(previous.chain if previous else None) if chain is None else chain,
                            array("Q", [stamp]) * count, _flags(zero, count), format, image, layers)
    reason = full_read_reason(previous, virtual_size=virtual_size, segment_size=segment_size, format=format)
    if reason:
        raise ValueError(f"{target}: cannot plan from the bitmap: {reason}")
    stamps = array("Q", previous.stamps)
    flags = bytearray(previous.zero)
    for index in dirty:
        stamps[index] = stamp
        flags[index] = 0
    for index in zero.intersection(dirty):
        flags[index] = 1
    return DiskSegments(target, virtual_size, segment_size, count, previous.chain, stamps, flags, format,
                        image, layers)


def _flags(indices: set[int], count: int) -> bytearray:
    """Given segment indices and the count, return one byte per segment: 1 for those in `indices`."""
    flags = bytearray(count)
    for index in indices:
        flags[index] = 1
    return flags


def run_stamp(now_ns: int, disks: Iterable[DiskSegments]) -> int:
    """Given the clock at the freeze (time.time_ns()) and the disks' previous states, return this run's
    stamp: the clock, or one past the newest stored stamp if the clock is not ahead of it."""
    return max([now_ns, *(disk.max_stamp() + 1 for disk in disks)])


def manifest(disk: DiskSegments) -> dict:
    """Given a disk's segments, return its `manifest.json` (the archive's description of the layout)."""
    return {"kvm_borg_segments": MANIFEST_VERSION, "target": disk.target, "virtual_size": disk.virtual_size,
            "segment_size": disk.segment_size, "segment_count": disk.count, "format": disk.format}
