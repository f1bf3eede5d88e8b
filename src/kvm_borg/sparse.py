"""Writing a stream of bytes into a file, leaving all-zero blocks as holes: the one sparse writer
that restore and the restic backend use; and `dig_holes`, which makes the same holes in a file
another tool wrote (borg extract --sparse leaves only its all-zero 4 MiB chunks as holes).

In: an open file descriptor and the stream's pieces, in order. Out: a file whose bytes equal the
stream, whose block-aligned all-zero blocks are holes, and whose length is the stream's length."""

from __future__ import annotations

import ctypes
import errno
import os

BLOCK = 4096  # hole granularity: a file system block
SEGMENT = 64 * 1024  # zero test of a larger piece first, blocks only inside mixed segments
WRITEBACK = 64 * 1024 * 1024  # a written file's pages are handed to writeback in steps of this size
_ZERO_SEGMENT = bytes(SEGMENT)
_ZERO_BLOCK = bytes(BLOCK)


def first_words(data, length: int) -> list[int]:
    """Given bytes (or a bytearray) and how many of them count, return the first 8 bytes of each of its
    whole blocks as numbers: a block can be all zeros only where this is 0 (a look at 8 bytes per 4 KiB,
    no scan: the prefilter of zero_runs)."""
    whole = length - length % BLOCK
    return memoryview(data)[:whole].cast("Q")[::BLOCK // 8].tolist() if whole else []


def zero_runs(data, length: int):
    """Given bytes (or a bytearray) whose first byte is block-aligned and how many of them count, yield
    (start, end) of each maximal run of whole block-aligned all-zero blocks in data[:length], in order (a
    partial last block is never part of one). The one scan behind SparseWriter and dig_holes: only blocks
    whose first 8 bytes are zero are compared (first_words), a long run a segment at a time."""
    firsts = first_words(data, length)
    if 0 not in firsts:
        return
    whole = len(firsts) * BLOCK
    per_segment, count = SEGMENT // BLOCK, len(firsts)
    index, start = firsts.index(0), None
    while True:
        offset = index * BLOCK
        if firsts[index] == 0 and data[offset:offset + BLOCK] == _ZERO_BLOCK:
            start = offset if start is None else start
            whole_segment = index % per_segment == 0 and offset + SEGMENT <= whole and \
                data[offset:offset + SEGMENT] == _ZERO_SEGMENT
            index += per_segment if whole_segment else 1
            if index < count:
                continue
            yield start, whole
            return
        if start is not None:
            yield start, offset
            start = None
        try:
            index = firsts.index(0, index + 1)
        except ValueError:
            return


class SparseWriter:
    """Writes a stream into a file descriptor, leaving holes where whole blocks are zero."""

    def __init__(self, fd: int, offset: int = 0):
        self.fd = fd
        self.offset = offset  # file offset where `pending` starts (the stream starts at `offset` in the file)
        self.pending = b""  # the tail of the stream that does not fill a block yet
        self.written = 0  # bytes of data actually written (not holes)
        self.handed_back = offset  # the file up to here is written back or on its way

    def write(self, data: bytes) -> None:
        # Each piece is written as it comes (no 4 MiB buffer to copy and shift): only a tail
        # shorter than a block waits for the next piece.
        if self.pending:
            data = self.pending + data
        elif not isinstance(data, bytes):
            data = bytes(data)
        usable = len(data) - len(data) % BLOCK
        self.pending = data[usable:]
        if usable:
            self._emit(data, usable)
        if self.offset - self.handed_back >= WRITEBACK:
            # Start writing back what is restored so far and let it leave the page cache
            # (DONTNEED starts writeback of dirty pages): the final fsync has little left to do,
            # and a large restore does not push the host's cache out.
            try:
                os.posix_fadvise(self.fd, self.handed_back, self.offset - self.handed_back, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # only a hint
            self.handed_back = self.offset

    def flush(self) -> int:
        """Write what is left (a piece of a stream written into the middle of a file: the file's size is not
        touched); return the offset where the stream ends."""
        if self.pending:
            self._emit(self.pending, len(self.pending))
            self.pending = b""
        return self.offset

    def close(self) -> int:
        """Write what is left, set the final size (a trailing hole too); return the size."""
        self.flush()
        os.ftruncate(self.fd, self.offset)
        return self.offset

    def _emit(self, data: bytes, length: int) -> None:
        """Write data[:length] at `offset`, leaving the block-aligned all-zero blocks as holes."""
        start = 0
        for zeros_start, zeros_end in zero_runs(data, length):
            if zeros_start > start:
                self._write(data, start, zeros_start)
            start = zeros_end
        if length > start:  # the common case: no block of zeros at all, one write
            self._write(data, start, length)
        self.offset += length

    def _write(self, data: bytes, start: int, end: int) -> None:
        view = memoryview(data)[start:end]
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + start + done)
        self.written += len(view)


# --- holes in a file another tool wrote ------------------------------------------------------------

DIG_READ = 4 << 20  # read back this much at a time
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def _punch(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of the file (fallocate PUNCH_HOLE|KEEP_SIZE: reads as zeros after)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _data_ranges(fd: int, size: int):
    """Given a file and its size, yield (start, end) of its data ranges (SEEK_DATA/SEEK_HOLE: holes skipped)."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after `position`
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        position = end


def dig_holes(fd: int) -> int:
    """Given a file descriptor open for reading and writing, turn each block-aligned all-zero block of the file's data into a hole, reading only its data ranges
    (holes already there are skipped); return the bytes deallocated. The content is unchanged.

    A piece without a zero block anywhere (the common case) costs one read and the prefilter; the runs of
    zero blocks are found by zero_runs, the scan SparseWriter uses."""
    size = os.fstat(fd).st_size
    buffer = bytearray(DIG_READ)
    view = memoryview(buffer)
    punched = 0
    for start, end in _data_ranges(fd, size):
        position = start - start % BLOCK
        while position < end:
            length = os.preadv(fd, [view[:min(DIG_READ, end - position)]], position)
            if length <= 0:
                break
            for zeros_start, zeros_end in zero_runs(buffer, length):
                _punch(fd, position + zeros_start, zeros_end - zeros_start)
                punched += zeros_end - zeros_start
            position += length
    return punched
