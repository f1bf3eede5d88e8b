"""The segment view's file systems: pyfuse3 Operations for the two spec kinds, read-only.

`NbdView` (kind `nbd`) shows each disk of an NBD export as `<target>/` with segment files and
`manifest.json`; `FilesView` (kind `files`) shows each disk's directory of segment files as one
flat `<target>.raw`. Both count the bytes they actually read (from NBD or from the segment files)
per disk in `bytes_read`. Blocking reads run in worker threads (trio.to_thread), at most as many at
once per disk as it has NBD connections (files: `spec.workers`); a failed read is EIO, never zeros.

Inodes: 1 is the root; the view's own directories and files are small numbers; segment inodes are
`segments.segment_inode(...)` (>= segments.SEGMENT_INODE_BASE), found again through a sorted array
(12 bytes per segment, no per-segment Python object).
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import stat
import threading
from array import array
from collections import OrderedDict

import pyfuse3
import trio

from kvm_borg import nbd_client
from kvm_borg.segment_view.spec import FilesDisk, NbdDisk, ViewSpec
from kvm_borg.segments import parse_segment_name, segment_count, segment_inode, segment_length, segment_name

logger = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 24 * 3600.0  # entry/attr timeout: nothing in a view ever changes while it is mounted
MANIFEST = "manifest.json"
#: NBD reads are made in blocks of this size (within one segment) whatever size FUSE asks for, and
#: the next blocks are fetched while the current one is served: a reader's 128 KiB-1 MiB requests
#: then cost one memory copy, not one NBD round trip each.
BLOCK = 1 << 20
#: How many blocks past the one being served are fetched meanwhile: the segment's next ones, and at
#: its end the first ones of the next segments changed in this run (`ViewSpec.run_stamp`, not zero),
#: which borg and restic are sure to read next (they read a directory's files in inode/name order,
#: the index order); a segment not changed in this run is never fetched ahead (the reader skips it).
AHEAD = 4
#: Blocks kept per view (fetched or in flight); a block is dropped once each of its bytes was served
#: (the kernel's readahead may ask for a block's pieces out of order), else the oldest beyond this.
CACHED_BLOCKS = 32
#: Blocks remembered as wholly served (never fetched ahead again: a late request for an earlier piece
#: must not fetch a block the reader is already past a second time).
SERVED_BLOCKS = 4 * CACHED_BLOCKS
#: Page cache on (readahead sends 256 KiB requests, several at once) rather than FOPEN_DIRECT_IO.
DIRECT_IO = False
OPEN_FILES = 64  # files kind: segment files kept open at once


def _attributes(ino: int, mode: int, size: int, ns: int, owner: tuple[int, int]) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = ino
    attr.generation = 0
    attr.entry_timeout = TIMEOUT
    attr.attr_timeout = TIMEOUT
    attr.st_mode = mode
    attr.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    attr.st_uid, attr.st_gid = owner
    attr.st_rdev = 0
    attr.st_size = size
    attr.st_blksize = 1 << 20
    attr.st_blocks = -(-size // 512)
    attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
    return attr


def _eio(what: str, exc: BaseException) -> pyfuse3.FUSEError:
    logger.error("%s: %s", what, exc)
    return pyfuse3.FUSEError(errno.EIO)


class InodeIndex:
    """Every segment inode of a view, sorted, with the global position (disk start + index) of each."""

    def __init__(self, per_disk: list[array]):
        """Given per disk an array('Q') of its segments' inodes in index order, index them all;
        ValueError when two are equal."""
        self.starts = array("Q")
        flat = array("Q")
        if sum(map(len, per_disk)) >= 2**32:
            raise ValueError("a view holds fewer than 2**32 segments")
        for inodes in per_disk:
            self.starts.append(len(flat))
            flat.extend(inodes)
        order = sorted(range(len(flat)), key=flat.__getitem__)
        self.inodes = array("Q", (flat[i] for i in order))
        self.positions = array("I", order)  # 4 bytes: a view holds fewer than 2**32 segments
        for a, b in zip(self.inodes, self.inodes[1:]):
            if a == b:
                raise ValueError(f"two segments share inode {a}")

    def find(self, ino: int) -> tuple[int, int] | None:
        """Given an inode, return (disk number, segment index) of the segment that has it, or None."""
        i = bisect.bisect_left(self.inodes, ino)
        if i == len(self.inodes) or self.inodes[i] != ino:
            return None
        position = self.positions[i]
        disk = bisect.bisect_right(self.starts, position) - 1
        return disk, position - self.starts[disk]


class ReadOnlyView(pyfuse3.Operations):
    """What both views share: read-only everywhere, no extended attributes, bytes_read per disk."""

    def __init__(self, spec: ViewSpec):
        super().__init__()
        self.spec = spec
        self.owner = spec.owner
        self.bytes_read = {disk.target: 0 for disk in spec.disks}

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 512
        st.f_blocks = sum(-(-disk.virtual_size // 512) for disk in self.spec.disks)
        st.f_bfree = st.f_bavail = 0
        st.f_files = st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    # ENOSYS: the kernel then stops asking (no extended attributes, nothing to flush on close), which
    # spares borg and restic one or two round trips to this process per file they check.
    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def forget(self, inode_list):
        return  # inodes are computed, never stored

    async def releasedir(self, fh):
        return

    async def release(self, fh):
        return

    async def _refuse(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = write = create = mknod = mkdir = unlink = rmdir = symlink = rename = link = _refuse
    setxattr = removexattr = fsync = _refuse

    def _check_read_only(self, flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)

    def root_attributes(self) -> pyfuse3.EntryAttributes:
        return _attributes(ROOT, stat.S_IFDIR | 0o500, 0, self.spec.now_ns, self.owner)

    async def opendir(self, inode, ctx):
        await self.getattr(inode, ctx)  # ENOENT for anything that is not there
        return inode


class NbdView(ReadOnlyView):
    """Kind `nbd`: `<target>/` per disk with segment files `%08d` and manifest.json, read from NBD."""

    def __init__(self, spec: ViewSpec):
        super().__init__(spec)
        self.disks: list[NbdDisk] = list(spec.disks)
        self.by_target = {disk.target: n for n, disk in enumerate(self.disks)}
        self.manifests = [json.dumps(disk.manifest, sort_keys=True).encode() + b"\n" for disk in self.disks]
        self.index = InodeIndex([array("Q", (segment_inode(disk.chain, disk.disk_index, i) for i in range(disk.count)))
                                 for disk in self.disks])
        self.total = self.index.starts[-1] + self.disks[-1].count if self.disks else 0
        for own in range(ROOT, 4 + 2 * len(self.disks)):  # root, directories, manifests
            if self.index.find(own) is not None:
                raise ValueError(f"a segment has inode {own}, which the view uses itself")
        self.pools = [nbd_client.HandlePool(disk.socket, disk.export, disk.connections) for disk in self.disks]
        self.limiters = [trio.CapacityLimiter(disk.connections) for disk in self.disks]
        self.blocks: OrderedDict[tuple[int, int, int], _Fetch] = OrderedDict()
        self.served: OrderedDict[tuple[int, int, int], None] = OrderedDict()
        # per disk, the indexes of its segments changed in this run that hold data, ascending
        self.changed = [array("I", (i for i in range(disk.count) if disk.stamps[i] == spec.run_stamp and not disk.zero[i]))
                        if spec.run_stamp is not None else array("I") for disk in self.disks]
        self.nursery = None  # the serving loop's nursery (set by __main__) runs the block fetches

    # inodes: 2 + 2n is disk n's directory, 3 + 2n its manifest.json
    def _dir_inode(self, n: int) -> int:
        return 2 + 2 * n

    def _manifest_inode(self, n: int) -> int:
        return 3 + 2 * n

    def check(self) -> None:
        """Open one NBD connection per disk and compare the export's size with the spec; NbdError if
        an export is missing or has another size."""
        for disk, pool in zip(self.disks, self.pools):
            actual = pool.export_size()
            if actual != disk.virtual_size:
                raise nbd_client.NbdError(f"NBD export {disk.export!r} has {actual} bytes, the spec says {disk.virtual_size}")

    def close(self) -> None:
        for pool in self.pools:
            pool.close()

    def _segment_attributes(self, n: int, index: int) -> pyfuse3.EntryAttributes:
        disk = self.disks[n]
        size = 0 if disk.zero[index] else segment_length(index, disk.virtual_size, disk.segment_size)
        return _attributes(segment_inode(disk.chain, disk.disk_index, index), stat.S_IFREG | 0o400, size,
                           disk.stamps[index], self.owner)

    def _node_attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self.root_attributes()
        n, kind = divmod(inode - 2, 2)
        if 0 <= n < len(self.disks):
            if kind == 0:
                return _attributes(inode, stat.S_IFDIR | 0o500, 0, self.spec.now_ns, self.owner)
            return _attributes(inode, stat.S_IFREG | 0o400, len(self.manifests[n]), self.spec.now_ns, self.owner)
        found = self.index.find(inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._segment_attributes(*found)

    async def getattr(self, inode, ctx=None):
        return self._node_attributes(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        name = os.fsdecode(name)
        if parent_inode == ROOT:
            n = self.by_target.get(name)
            if n is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._node_attributes(self._dir_inode(n))
        n, kind = divmod(parent_inode - 2, 2)
        if kind != 0 or not 0 <= n < len(self.disks):
            raise pyfuse3.FUSEError(errno.ENOENT if parent_inode > ROOT else errno.ENOTDIR)
        if name == MANIFEST:
            return self._node_attributes(self._manifest_inode(n))
        index = parse_segment_name(name, self.disks[n].count)
        if index is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._segment_attributes(n, index)

    async def readdir(self, fh, start_id, token):
        if fh == ROOT:
            for n in range(start_id, len(self.disks)):
                if not pyfuse3.readdir_reply(token, os.fsencode(self.disks[n].target),
                                             self._node_attributes(self._dir_inode(n)), n + 1):
                    return
            return
        n = (fh - 2) // 2
        disk = self.disks[n]
        for position in range(start_id, disk.count + 1):  # segments in index order, then the manifest
            if position < disk.count:
                entry = (segment_name(position, disk.count).encode(), self._segment_attributes(n, position))
            else:
                entry = (MANIFEST.encode(), self._node_attributes(self._manifest_inode(n)))
            if not pyfuse3.readdir_reply(token, entry[0], entry[1], position + 1):
                return

    async def open(self, inode, flags, ctx):
        self._check_read_only(flags)
        attr = self._node_attributes(inode)
        if stat.S_ISDIR(attr.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode < 2 + 2 * len(self.disks):  # a manifest: fh past every segment's
            return pyfuse3.FileInfo(fh=self.total + (inode - 3) // 2, keep_cache=True)
        n, index = self.index.find(inode)
        return pyfuse3.FileInfo(fh=self.index.starts[n] + index, direct_io=DIRECT_IO, keep_cache=not DIRECT_IO)

    async def read(self, fh, off, size):
        if fh >= self.total:
            data = self.manifests[fh - self.total]
            return data[off:off + size]
        n = bisect.bisect_right(self.index.starts, fh) - 1
        index = fh - self.index.starts[n]
        disk = self.disks[n]
        if disk.zero[index]:
            return b""
        length = segment_length(index, disk.virtual_size, disk.segment_size)
        end = min(off + size, length)
        parts = []
        while off < end:
            block, within = divmod(off, BLOCK)
            data = await self._block(n, index, block, length)
            take = min(end - off, len(data) - within)
            parts.append(memoryview(data)[within:within + take])  # no copy: FUSE copies it once
            off += take
            entry = self.blocks.get((n, index, block))
            if entry is not None:
                entry.served += take
                if entry.served >= len(data):  # every byte served (in any order): a reader is past it
                    del self.blocks[(n, index, block)]
                    self.served[(n, index, block)] = None
                    while len(self.served) > SERVED_BLOCKS:
                        self.served.popitem(last=False)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _block(self, n: int, index: int, block: int, length: int) -> bytes:
        """Return block `block` of segment `index` of disk `n` (its bytes, up to BLOCK), from the cache or
        fetched now; the next AHEAD blocks (see AHEAD) are started in the background."""
        entry = self._start(n, index, block, length)
        self._start_ahead(n, index, block, length)
        await entry.done.wait()
        if entry.error is not None:
            self.blocks.pop((n, index, block), None)
            raise _eio(f"{self.disks[n].target} segment {index}", entry.error)
        return entry.data

    def _start_ahead(self, n: int, index: int, block: int, length: int) -> None:
        """Start fetching the AHEAD blocks after `block` of segment `index`: the segment's own, then the
        first blocks of the next segments of disk `n` changed in this run."""
        wanted = AHEAD
        for ahead in range(block + 1, min(block + 1 + AHEAD, -(-length // BLOCK))):
            self._start(n, index, ahead, length, ahead=True)
            wanted -= 1
        changed = self.changed[n]
        position = bisect.bisect_right(changed, index)
        disk = self.disks[n]
        while wanted > 0 and position < len(changed):
            following = changed[position]
            following_length = segment_length(following, disk.virtual_size, disk.segment_size)
            for ahead in range(min(wanted, -(-following_length // BLOCK))):
                self._start(n, following, ahead, following_length, ahead=True)
                wanted -= 1
            position += 1

    def _start(self, n: int, index: int, block: int, length: int, ahead: bool = False) -> "_Fetch | None":
        """Return the fetch of block `block` of segment `index` (`length` bytes) of disk `n`, started now
        unless cached or in flight; `ahead`: only if no reader was served all of it yet (then None)."""
        key = (n, index, block)
        entry = self.blocks.get(key)
        if entry is not None:
            self.blocks.move_to_end(key)
            return entry
        if ahead and key in self.served:
            return None
        entry = self.blocks[key] = _Fetch()
        while len(self.blocks) > CACHED_BLOCKS:
            self.blocks.popitem(last=False)
        disk = self.disks[n]
        offset = index * disk.segment_size + block * BLOCK
        self.nursery.start_soon(self._fetch, entry, n, offset, min(BLOCK, length - block * BLOCK))
        return entry

    async def _fetch(self, entry: "_Fetch", n: int, offset: int, size: int) -> None:
        try:
            entry.data = await trio.to_thread.run_sync(self.pools[n].read, offset, size, limiter=self.limiters[n])
            self.bytes_read[self.disks[n].target] += len(entry.data)
        except (nbd_client.NbdError, OSError) as exc:
            entry.error = exc
        finally:
            entry.done.set()


class _Fetch:
    """One block read in flight or done: its bytes or its error, and an event set when it ended."""

    __slots__ = ("done", "data", "error", "served")

    def __init__(self):
        self.done = trio.Event()
        self.data = b""
        self.error: BaseException | None = None
        self.served = 0  # bytes of it handed to readers so far


class SegmentFiles:
    """One `files` disk: its validated segment files and a small cache of open descriptors."""

    def __init__(self, disk: FilesDisk):
        """Given a FilesDisk, check its directory (every segment present, a regular file of 0 bytes or
        exactly its length; manifest.json, if present, agrees); ValueError naming the first problem."""
        self.disk = disk
        self.count = segment_count(disk.virtual_size, disk.segment_size)
        self.zero = bytearray(self.count)
        self._open: OrderedDict[int, list[int]] = OrderedDict()  # index -> [fd, readers]
        self._lock = threading.Lock()
        self._check_manifest()
        for index in range(self.count):
            path = self.path(index)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise ValueError(f"{disk.target}: segment {path}: {exc.strerror}") from None
            length = segment_length(index, disk.virtual_size, disk.segment_size)
            if not stat.S_ISREG(st.st_mode) or st.st_size not in (0, length):
                raise ValueError(f"{disk.target}: segment {path} is not a regular file of 0 or {length} bytes")
            self.zero[index] = st.st_size == 0

    def _check_manifest(self) -> None:
        path = os.path.join(self.disk.directory, MANIFEST)
        try:
            with open(path, "rb") as handle:
                data = json.loads(handle.read(1 << 16))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.disk.target}: {path}: {exc}") from None
        expected = {"virtual_size": self.disk.virtual_size, "segment_size": self.disk.segment_size,
                    "segment_count": self.count}
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in expected.items()):
            raise ValueError(f"{self.disk.target}: {path} describes another geometry than the spec")

    def path(self, index: int) -> str:
        return os.path.join(self.disk.directory, segment_name(index, self.count))

    def _acquire(self, index: int) -> int:
        """Return an open descriptor of segment `index`, held until `_release(index)`; descriptors no
        reader holds are closed, oldest first, beyond OPEN_FILES (one in use is never closed: its number
        could be reused for another file)."""
        with self._lock:
            entry = self._open.get(index)
            if entry is not None:
                entry[1] += 1
                self._open.move_to_end(index)
                return entry[0]
        fd = os.open(self.path(index), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with self._lock:
            entry = self._open.get(index)
            if entry is not None:  # another reader opened it meanwhile
                os.close(fd)
                entry[1] += 1
                return entry[0]
            self._open[index] = [fd, 1]
            for old in [i for i, (_, users) in self._open.items() if users == 0][:max(0, len(self._open) - OPEN_FILES)]:
                os.close(self._open.pop(old)[0])
        return fd

    def _release(self, index: int) -> None:
        with self._lock:
            self._open[index][1] -= 1

    def read(self, offset: int, size: int) -> tuple[bytes, int]:
        """Given an offset and a size within the disk, return (the bytes, how many came from files):
        zeros for 0-byte segments; a short or failed read is an OSError."""
        size = max(0, min(size, self.disk.virtual_size - offset))
        parts = []
        from_files = 0
        while size > 0:
            index, within = divmod(offset, self.disk.segment_size)
            n = min(size, segment_length(index, self.disk.virtual_size, self.disk.segment_size) - within)
            if self.zero[index]:
                parts.append(bytes(n))
            else:
                fd = self._acquire(index)
                try:
                    data = os.pread(fd, n, within)
                finally:
                    self._release(index)
                if len(data) != n:
                    raise OSError(errno.EIO, f"segment {self.path(index)}: short read at {within}")
                parts.append(data)
                from_files += n
            offset += n
            size -= n
        return (parts[0] if len(parts) == 1 else b"".join(parts)), from_files

    def close(self) -> None:
        with self._lock:
            while self._open:
                os.close(self._open.popitem()[1][0])


class FilesView(ReadOnlyView):
    """Kind `files`: one flat read-only `<target>.raw` per disk stitched from its segment files."""

    def __init__(self, spec: ViewSpec):
        super().__init__(spec)
        self.disks = [SegmentFiles(disk) for disk in spec.disks]
        self.names = {f"{disk.target}.raw": n for n, disk in enumerate(spec.disks)}
        self.limiter = trio.CapacityLimiter(spec.workers)
        self.mode = 0o444 if spec.allow_other else 0o400

    def check(self) -> None:
        return  # SegmentFiles checked every segment when it was made

    def close(self) -> None:
        for disk in self.disks:
            disk.close()

    def _node_attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self.root_attributes()
        n = inode - 2
        if not 0 <= n < len(self.disks):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return _attributes(inode, stat.S_IFREG | self.mode, self.disks[n].disk.virtual_size, self.spec.now_ns,
                           self.owner)

    def root_attributes(self) -> pyfuse3.EntryAttributes:
        return _attributes(ROOT, stat.S_IFDIR | (0o555 if self.spec.allow_other else 0o500), 0, self.spec.now_ns,
                           self.owner)

    async def getattr(self, inode, ctx=None):
        return self._node_attributes(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        n = self.names.get(os.fsdecode(name)) if parent_inode == ROOT else None
        if n is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._node_attributes(2 + n)

    async def readdir(self, fh, start_id, token):
        for n in range(start_id, len(self.disks)):
            name = f"{self.disks[n].disk.target}.raw"
            if not pyfuse3.readdir_reply(token, name.encode(), self._node_attributes(2 + n), n + 1):
                return

    async def open(self, inode, flags, ctx):
        self._check_read_only(flags)
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self._node_attributes(inode)
        return pyfuse3.FileInfo(fh=inode - 2, keep_cache=True)

    async def read(self, fh, off, size):
        disk = self.disks[fh]
        try:
            data, from_files = await trio.to_thread.run_sync(disk.read, off, size, limiter=self.limiter)
        except OSError as exc:
            raise _eio(f"{disk.disk.target} at offset {off}", exc) from None
        self.bytes_read[disk.disk.target] += from_files
        return data


def make_view(spec: ViewSpec) -> ReadOnlyView:
    """Given a parsed spec, return its file system (NbdView or FilesView); ValueError or NbdError when the
    sources do not match the spec (call `check()` to test the NBD exports before mounting)."""
    return NbdView(spec) if spec.kind == "nbd" else FilesView(spec)
