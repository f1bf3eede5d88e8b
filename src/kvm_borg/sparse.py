"""Writing a stream of bytes into a file, leaving all-zero blocks as holes: the one sparse writer
that restore and the restic backend use.

In: an open file descriptor and the stream's pieces, in order. Out: a file whose bytes equal the
stream, whose block-aligned all-zero blocks are holes, and whose length is the stream's length."""

from __future__ import annotations

import os

BLOCK = 4096  # hole granularity: a file system block
SEGMENT = 64 * 1024  # zero test of a larger piece first, blocks only inside mixed segments
WRITEBACK = 64 * 1024 * 1024  # a written file's pages are handed to writeback in steps of this size
_ZERO_SEGMENT = bytes(SEGMENT)
_ZERO_BLOCK = bytes(BLOCK)


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
        if data.find(_ZERO_BLOCK, 0, length) == -1:  # the common case: no block of zeros at all, one write
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
