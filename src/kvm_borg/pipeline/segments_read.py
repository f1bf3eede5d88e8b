"""Reading a segmented disk (archive layout "segments") back from a repository.

In: a backend, an archive and a checked RestoreDisk of layout "segments" (kvm_borg.restore_plan:
its directory in the archive, segment size and count, virtual size, format). The backend's
`stream_tar` passes an uncompressed tar of that directory; it is parsed with `tarfile` in stream
mode in a second thread while the backend's child writes it (the child is stopped as soon as the
parser refuses something). Out: the disk's raw guest content, written into a file descriptor at
`index * size` per segment (sparse: 0-byte segments and all-zero blocks stay holes, kvm_borg.sparse),
or into a device (every byte written, zeros too). Segments come in the archive's order (borg: by
the view's inode numbers, i.e. scrambled), each written at its own offset.

The archive is untrusted: every member is checked before a byte of it is written. Allowed are
the directory itself (borg lists it), regular files named like a segment (`%08d`, wider only
beyond 10**8 segments) below `count`, each exactly its segment's length or 0 bytes (all zeros),
and one `manifest.json` that agrees with meta.json; nothing else, no name twice, none missing.
Any violation is a UsageError naming the disk and the member (one line, exit 2); the caller
removes what it was writing.
"""

from __future__ import annotations

import json
import os
import queue
import tarfile
import threading
from dataclasses import dataclass

from kvm_borg import segments
from kvm_borg.errors import KvmBorgError, UsageError
from kvm_borg.models import RepositoryBackend
from kvm_borg.restore_plan import RestoreDisk
from kvm_borg.sparse import SparseWriter

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 64 << 10
CHUNK = 1 << 20  # bytes read from a member at a time
_TAR_BUFFER = 1 << 20
_QUEUE_PIECES = 32  # pieces of the backend's stream waiting for the parser (each up to a pipe's read)
_ZEROS = bytes(CHUNK)


# --- the pure checks ---------------------------------------------------------------------------


def member_kind(name: str, is_dir: bool, is_file: bool, directory: str, count: int) -> tuple[str, int | None] | None:
    """Given a tar member's name and type, the disk's directory in the archive (relative, normalized) and its
    segment count, return ("dir", None) for the directory itself, ("manifest", None), ("segment", index), or
    None for a member that does not belong there (another name, another type, a path below or beside it)."""
    name = name.lstrip("/")
    if name == directory:
        return ("dir", None) if is_dir else None
    parent, _, leaf = name.rpartition("/")
    if parent != directory or not is_file:
        return None
    if leaf == MANIFEST_NAME:
        return ("manifest", None)
    index = segments.parse_segment_name(leaf, count)
    return None if index is None else ("segment", index)


def manifest_problem(manifest: object, disk: RestoreDisk) -> str | None:
    """Given a parsed manifest.json and the disk as meta.json describes it, return why they disagree, or None."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    expected = {"kvm_borg_segments": MANIFEST_FORMAT, "target": disk.target, "virtual_size": disk.virtual_size,
                "segment_size": disk.segment_size, "segment_count": disk.segment_count, "format": disk.format}
    for key, value in expected.items():
        found = manifest.get(key)
        if found != value or isinstance(found, bool):
            return f"says {key} {found!r}, meta.json {value!r}"
    return None


# --- where the content goes --------------------------------------------------------------------


class SparseFileOutput:
    """Writes segments into a fresh regular file at their offsets; 0-byte segments and all-zero blocks stay
    holes. `finish` sets the file's size to the virtual size."""

    def __init__(self, fd: int, virtual_size: int):
        self.fd, self.virtual_size = fd, virtual_size
        self.writer: SparseWriter | None = None
        self.written = 0  # bytes of data written (not holes)

    def begin(self, index: int, offset: int) -> None:
        self.writer = SparseWriter(self.fd, offset)

    def data(self, chunk: bytes) -> None:
        self.writer.write(chunk)

    def end(self) -> None:
        self.writer.flush()
        self.written += self.writer.written
        self.writer = None

    def zero(self, index: int, offset: int, length: int) -> None:
        """A 0-byte segment: nothing to write, it stays a hole."""

    def finish(self) -> None:
        os.ftruncate(self.fd, self.virtual_size)


class DenseOutput:
    """Writes every byte of every segment (zeros too) at its offset: into a block device."""

    def __init__(self, fd: int):
        self.fd = fd
        self.offset = 0
        self.written = 0

    def begin(self, index: int, offset: int) -> None:
        self.offset = offset

    def data(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            done = os.pwrite(self.fd, view, self.offset)
            view, self.offset, self.written = view[done:], self.offset + done, self.written + done

    def end(self) -> None:
        pass

    def zero(self, index: int, offset: int, length: int) -> None:
        self.begin(index, offset)
        while length:
            piece = min(length, CHUNK)
            self.data(_ZEROS[:piece])
            length -= piece

    def finish(self) -> None:
        pass


# --- reading the tar -----------------------------------------------------------------------------


@dataclass
class SegmentsRead:
    """What reading a segmented disk found: segments with data, 0-byte (zero) segments, bytes written."""

    data_segments: int = 0
    zero_segments: int = 0
    bytes_written: int = 0


def parse_segments(stream, disk: RestoreDisk, output, what: str) -> SegmentsRead:
    """Given a readable tar stream of a segmented disk's directory, the RestoreDisk, an output (SparseFileOutput or
    DenseOutput) and what it is (for messages), check every member and pass each segment to the
    output; return the SegmentsRead. A member that does not belong, a wrong size, a name twice, a missing
    segment or manifest, a manifest that disagrees with meta.json, or a broken tar is a UsageError."""
    directory = disk.image.archive_path.lstrip("/")
    count = disk.segment_count
    seen = bytearray((count + 7) // 8)
    found = SegmentsRead()
    manifest_seen = False
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFFER) as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every member it read: not here (a disk may have millions)
                kind = member_kind(member.name, member.isdir(), member.isreg() and not member.issparse(),
                                   directory, count)
                if kind is None:
                    raise UsageError(f"{what}: the archive holds {member.name!r} ({_type_name(member)}) in the "
                                     "segment directory; refused")
                if kind[0] == "dir":
                    continue
                if kind[0] == "manifest":
                    if manifest_seen:
                        raise UsageError(f"{what}: the archive holds {MANIFEST_NAME} twice; refused")
                    manifest_seen = True
                    _check_manifest(tar, member, disk, what)
                    continue
                index = kind[1]
                if seen[index >> 3] & (1 << (index & 7)):
                    raise UsageError(f"{what}: the archive holds segment {member.name!r} twice; refused")
                seen[index >> 3] |= 1 << (index & 7)
                length = segments.segment_length(index, disk.virtual_size, disk.segment_size)
                offset = index * disk.segment_size
                if member.size == 0:
                    output.zero(index, offset, length)
                    found.zero_segments += 1
                    continue
                if member.size != length:
                    raise UsageError(f"{what}: segment {member.name!r} holds {member.size} bytes, not {length} "
                                     "(or 0); refused")
                output.begin(index, offset)
                source = tar.extractfile(member)
                left = length
                while left:
                    chunk = source.read(min(CHUNK, left))
                    if not chunk:
                        raise UsageError(f"{what}: segment {member.name!r} ends early; refused")
                    output.data(chunk)
                    left -= len(chunk)
                output.end()
                found.data_segments += 1
    except tarfile.TarError as exc:
        raise UsageError(f"{what}: the archive's segment directory is not a readable tar stream ({exc})") from None
    if not manifest_seen:
        raise UsageError(f"{what}: the archive's segment directory has no {MANIFEST_NAME}; refused")
    missing = found.data_segments + found.zero_segments
    if missing != count:
        first = next(i for i in range(count) if not seen[i >> 3] & (1 << (i & 7)))
        raise UsageError(f"{what}: the archive lacks {count - missing} of {count} segments (the first: "
                         f"{segments.segment_name(first, count)}); refused")
    output.finish()
    found.bytes_written = output.written
    return found


def _check_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo, disk: RestoreDisk, what: str) -> None:
    if member.size > MAX_MANIFEST_BYTES:
        raise UsageError(f"{what}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes; refused")
    text = tar.extractfile(member).read()
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UsageError(f"{what}: {MANIFEST_NAME} is not valid JSON; refused") from None
    problem = manifest_problem(manifest, disk)
    if problem:
        raise UsageError(f"{what}: {MANIFEST_NAME} {problem}; refused")


def _type_name(member: tarfile.TarInfo) -> str:
    if member.issparse():
        return "a sparse tar member"
    for test, name in ((member.isreg, "a regular file"), (member.isdir, "a directory"), (member.issym, "a symlink"),
                       (member.islnk, "a hard link"), (member.isdev, "a device or FIFO")):
        if test():
            return name
    return "an unknown kind"


class _Feed:
    """A file object the parser thread reads, fed with the pieces the backend's child writes."""

    _END = object()

    def __init__(self):
        self.pieces: queue.Queue = queue.Queue(maxsize=_QUEUE_PIECES)
        self.current = memoryview(b"")
        self.ended = False

    def put(self, piece, alive) -> None:
        """Queue a piece (or `_END`), waiting while the queue is full as long as `alive()` says the reader reads."""
        while True:
            try:
                self.pieces.put(piece, timeout=0.2)
                return
            except queue.Full:
                if not alive():
                    return

    def read(self, size: int = -1) -> bytes:
        while not self.current and not self.ended:
            piece = self.pieces.get()
            if piece is self._END:
                self.ended = True
            else:
                self.current = memoryview(piece)
        if size is None or size < 0:
            size = len(self.current)
        data, self.current = bytes(self.current[:size]), self.current[size:]
        return data


def read_segments(backend: RepositoryBackend, archive: str, disk: RestoreDisk, output, what: str | None = None
                  ) -> SegmentsRead:
    """Given a backend, an archive, a checked segmented RestoreDisk and an output (SparseFileOutput for a
    fresh file, DenseOutput for a device), stream the disk's segment directory
    (`backend.stream_tar`) and write its raw content into the output; return the SegmentsRead.

    Hostile or broken content is a UsageError (the backend's child is stopped at once); a failing backend
    its own KvmBorgError."""
    what = what or f"archive {archive}: disk {disk.target}"
    feed = _Feed()
    outcome: dict = {}

    def parse() -> None:
        try:
            outcome["read"] = parse_segments(feed, disk, output, what)
        except BaseException as exc:  # handed to the calling thread
            outcome["error"] = exc
        finally:
            outcome["done"] = True

    parser = threading.Thread(target=parse, name=f"segments-{disk.target}", daemon=True)
    parser.start()

    def write(data: bytes) -> None:
        if "done" in outcome:
            if "error" in outcome:  # refused: stop the child
                raise outcome["error"]
            return  # after the tar's end marker: its padding (the tar is the backend's own, not the archive's)
        feed.put(bytes(data), parser.is_alive)

    try:
        backend.stream_tar(archive, disk.image.archive_path, write)
    except BaseException:
        refused = outcome.get("error")  # set before the child was stopped: the parser's refusal is the cause
        feed.put(_Feed._END, parser.is_alive)
        parser.join()
        if isinstance(refused, KvmBorgError):
            raise refused from None
        raise
    feed.put(_Feed._END, parser.is_alive)
    parser.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["read"]

