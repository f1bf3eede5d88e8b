"""Reading an NBD export (QEMU's backup job, `qemu-nbd -r`): the one module that speaks NBD.

A thin wrapper over libnbd's Python bindings (`import nbd`, Debian python3-libnbd; not on PyPI:
scripts/setup.sh links Debian's module into the venv). Three things are read from an export:
its size, a metadata context's extents (`base:allocation`, `qemu:dirty-bitmap:<name>`) and bytes.

A libnbd handle is one connection; its calls are serialized by libnbd's own lock. A reader with
several threads opens one handle per thread or keeps a small pool (`HandlePool`); QEMU's NBD
server accepts several connections, `qemu-nbd` only as many as its `-e/--shared` allows (a further
client then waits in the handshake) and, without `-t/--persistent`, exits when its last client
disconnects. Measured with QEMU 7.2 / libnbd 1.14: a read-only `qemu-nbd` export answers
`can_multi_conn()` False (nothing is written, so connections cannot disagree) and a maximum block
size of 32 MiB (`read` must stay below it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from kvm_borg.errors import KvmBorgError

#: NBD `block_status` lengths are 32-bit: ask for less than 4 GiB at a time, aligned.
MAX_STATUS_REQUEST = (4 << 30) - (1 << 20)
#: base:allocation flags (NBD protocol): the range is a hole / reads as zeros.
STATE_HOLE = 1
STATE_ZERO = 2
#: qemu:dirty-bitmap:* flag: the range changed since the bitmap was created.
STATE_DIRTY = 1
ALLOCATION = "base:allocation"


class NbdError(KvmBorgError):
    """An NBD connection or command failed; the message names the export and libnbd's reason."""


def nbd_available() -> str | None:
    """Return None when libnbd's Python bindings import, else one line saying why not."""
    try:
        import nbd  # noqa: F401
    except ImportError as exc:
        return f"libnbd's Python bindings are not importable ({exc}): install python3-libnbd (scripts/setup.sh links it into the venv)"
    return None


def _nbd():
    try:
        import nbd
    except ImportError:
        raise NbdError(nbd_available()) from None
    return nbd


def open_export(socket: str, export: str, contexts: Sequence[str] = ()):
    """Given a unix socket path, an export name and the metadata contexts to negotiate (e.g.
    "base:allocation", "qemu:dirty-bitmap:backup-vda"), connect; return the libnbd handle.

    Every context asked for must be offered by the server, else NbdError (a missing bitmap must never
    read as "nothing changed"). Close the handle with `close(handle)`."""
    nbd = _nbd()
    handle = nbd.NBD()
    try:
        for name in contexts:
            handle.add_meta_context(name)
        handle.set_export_name(export)
        handle.connect_unix(socket)
        for name in contexts:
            if not handle.can_meta_context(name):
                raise NbdError(f"NBD export {export!r} at {socket}: the server offers no {name!r}")
    except nbd.Error as exc:
        close(handle)
        raise NbdError(f"cannot open NBD export {export!r} at {socket}: {exc}") from None
    except BaseException:
        close(handle)
        raise
    return handle


def close(handle) -> None:
    """Given a handle from open_export, disconnect it (errors ignored: the server may be gone); the
    handle itself is freed when its last reference goes."""
    nbd = _nbd()
    try:
        handle.shutdown()
    except nbd.Error:
        pass


def size(handle) -> int:
    """Given a handle, return the export's size in bytes."""
    nbd = _nbd()
    try:
        return handle.get_size()
    except nbd.Error as exc:
        raise NbdError(f"cannot read the NBD export's size: {exc}") from None


def merge_extents(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Given extents [(offset, length, flags)] in order, return them with touching runs of equal
    flags joined (the server may split a run over several replies)."""
    merged: list[tuple[int, int, int]] = []
    for offset, length, flags in extents:
        if merged and merged[-1][2] == flags and merged[-1][0] + merged[-1][1] == offset:
            start, previous, _ = merged[-1]
            merged[-1] = (start, previous + length, flags)
        else:
            merged.append((offset, length, flags))
    return merged


def extents(handle, context: str, size: int) -> list[tuple[int, int, int]]:
    """Given a handle, a negotiated metadata context and the export size, return its whole map as
    [(offset, length, flags)] covering 0..size exactly, in order, equal neighbours merged.

    block_status is asked in requests under 4 GiB and asked again from where each (possibly
    partial) reply ended; a reply without the context, or one that does not advance, is an NbdError."""
    nbd = _nbd()
    found: list[tuple[int, int, int]] = []
    offset = 0
    while offset < size:
        request = min(size - offset, MAX_STATUS_REQUEST)
        reply: list[tuple[int, int, int]] = []

        def collect(metacontext, start, entries, _error, reply=reply):
            if metacontext != context:
                return 0
            position = start
            for i in range(0, len(entries) - 1, 2):
                length, flags = entries[i], entries[i + 1]
                reply.append((position, length, flags))
                position += length
            return 0

        try:
            handle.block_status(request, offset, collect)
        except nbd.Error as exc:
            raise NbdError(f"block status of {context!r} at offset {offset}: {exc}") from None
        advanced = offset
        for start, length, flags in reply:
            if start != advanced or length <= 0:
                raise NbdError(f"block status of {context!r}: reply does not continue at offset {advanced}")
            length = min(length, size - start)  # the last extent may reach past the end
            found.append((start, length, flags))
            advanced = start + length
            if advanced >= size:
                break
        if advanced <= offset:
            raise NbdError(f"block status of {context!r}: no extent at offset {offset}")
        offset = advanced
    return merge_extents(found)


def read(handle, offset: int, length: int) -> bytes:
    """Given a handle, an offset and a length (at most the server's maximum block size, 32 MiB for
    QEMU), return exactly those bytes; a failed read is an NbdError, never zeros."""
    nbd = _nbd()
    try:
        return handle.pread(length, offset)
    except nbd.Error as exc:
        raise NbdError(f"NBD read of {length} bytes at offset {offset}: {exc}") from None


class HandlePool:
    """At most `connections` handles to one export, each used by one thread at a time.

    Handles are opened on first need, so an export that allows fewer connections is never asked
    for more than a caller actually uses at once."""

    def __init__(self, socket: str, export: str, connections: int):
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self.socket = socket
        self.export = export
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._open = 0
        self._limit = connections
        self._lock = threading.Lock()
        self._all: list = []

    def _take(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            may_open = self._open < self._limit
            if may_open:
                self._open += 1
        if not may_open:
            return self._idle.get()
        try:
            handle = open_export(self.socket, self.export)
        except BaseException:
            with self._lock:
                self._open -= 1
            raise
        with self._lock:
            self._all.append(handle)
        return handle

    def export_size(self) -> int:
        """Return the export's size, asked through an idle handle (opening the first one if needed)."""
        handle = self._take()
        try:
            return size(handle)
        finally:
            self._idle.put(handle)

    def read(self, offset: int, length: int) -> bytes:
        """Given an offset and a length, read them through an idle handle (see `read`); return the bytes."""
        handle = self._take()
        try:
            return read(handle, offset, length)
        finally:
            self._idle.put(handle)

    def close(self) -> None:
        """Disconnect every handle the pool opened."""
        with self._lock:
            handles, self._all = self._all, []
        for handle in handles:
            close(handle)
