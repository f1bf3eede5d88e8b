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


def maybe_zero_blocks(data, length: int) -> bool:
    """Given bytes (or a bytearray) and how many of them count, return False when none of its whole aligned
    blocks can be all zeros (not one starts with 8 zero bytes: a look at 8 bytes per 4 KiB, no scan), True
    when one may be (the caller then looks closer)."""
    whole = length - length % BLOCK
    if not whole:
        return False
    words = memoryview(data)[:whole].cast("Q")[::BLOCK // 8]  # the first 8 bytes of each block
    return 0 in words.tolist()


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
        if not maybe_zero_blocks(data, length) or data.find(_ZERO_BLOCK, 0, length) == -1:
            # the common case: no block of zeros at all, one write
            self._write(data, 0, length)
        else:
            run_start = None  # start (index in data) of a run of blocks to write
            for position in range(0, length, SEGMENT):
                end = min(position + SEGMENT, length)
                if end - position == SEGMENT and data[position:end] == _ZERO_SEGMENT:
                    run_start = self._end_run(data, run_start, position)
                elif data.find(_ZERO_BLOCK, position, end) == -1:  # data only: test no block
                    if run_start is None:
                        run_start = position
                else:
                    for here in range(position, end, BLOCK):
                        if here + BLOCK <= end and data[here:here + BLOCK] == _ZERO_BLOCK:
                            run_start = self._end_run(data, run_start, here)
                        elif run_start is None:
                            run_start = here
            self._end_run(data, run_start, length)
        self.offset += length

    def _end_run(self, data: bytes, run_start: int | None, end: int) -> None:
        if run_start is not None and end > run_start:
            self._write(data, run_start, end)
        return None

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

    A piece without a zero block anywhere (the common case: one `find`) costs one read; only pieces with
    zeros are looked at block by block."""
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
            run_start = None
            found = buffer.find(_ZERO_BLOCK, 0, length) if maybe_zero_blocks(buffer, length) else -1
            while found != -1:
                block = found + (-found % BLOCK)  # the first aligned block at or after the zeros
                if block + BLOCK > length:
                    break
                if buffer[block:block + BLOCK] == _ZERO_BLOCK:
                    run_start = block
                    block += BLOCK
                    while block + BLOCK <= length and buffer[block:block + BLOCK] == _ZERO_BLOCK:
                        block += BLOCK
                    _punch(fd, position + run_start, block - run_start)
                    punched += block - run_start
                found = buffer.find(_ZERO_BLOCK, block, length) if block < length else -1
            position += length
    return punched
