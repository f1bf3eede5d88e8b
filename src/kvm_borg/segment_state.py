"""The bitmap method's state file: per domain, the checkpoint the segment stamps are relative to and
every disk's `segments.DiskSegments`, in `state_dir/bitmap/<domain uuid>.json`.

The file is JSON `{"version": 1, "uuid", "checkpoint", "disks": {target: {...}}}`, written atomically
and durably (kvm_borg.atomic: temp file, fsync, rename, fsync of the directory), mode 0600; each
disk's stamps (array('Q'), little-endian) and zero flags (one byte per segment) are stored
zlib-compressed and base64-encoded. A file that is unreadable, corrupt or of another version is
treated as absent (a warning names it): a lost state only costs a full read, never a failed backup.

`layer_identity` records the image layers of a shut-off domain's disk, for the offline check.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import stat
import sys
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from kvm_borg import atomic
from kvm_borg.segments import CHAIN_LIMIT, DiskSegments

log = logging.getLogger(__name__)

STATE_VERSION = 1
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MAX_FILE = 1 << 30  # no sane state is this large; a bigger file is not read into memory


@dataclass
class BitmapState:
    """One domain's bitmap state: the kvm-borg checkpoint the stamps are relative to (None after an
    offline run or before the first), the disks by target, and the domain's UUID (the file's name)."""

    checkpoint: str | None
    disks: dict[str, DiskSegments] = field(default_factory=dict)
    uuid: str = ""


class StateFormatError(ValueError):
    """The state file's content is not a valid version-1 state."""


def state_path(state_dir: str | os.PathLike, uuid: str) -> Path:
    """Given the state dir and a domain UUID, return its state file's path; a UUID that is not one
    (it would name another file) is a ValueError."""
    if not _UUID.fullmatch(uuid or ""):
        raise ValueError(f"not a domain UUID: {uuid!r}")
    return Path(state_dir) / "bitmap" / f"{uuid.lower()}.json"


# --- encoding -------------------------------------------------------------------------------


def _pack(data: bytes) -> str:
    """Given raw bytes, return them zlib-compressed and base64-encoded."""
    return base64.b64encode(zlib.compress(data, 1)).decode("ascii")


def _unpack(text: object, length: int, what: str) -> bytes:
    """Given a base64 zlib string and the exact length it must inflate to, return the bytes (never
    inflating past that length); anything else is a StateFormatError naming `what`."""
    if not isinstance(text, str):
        raise StateFormatError(f"{what}: expected a string")
    try:
        inflater = zlib.decompressobj()
        data = inflater.decompress(base64.b64decode(text, validate=True), length + 1)
    except (binascii.Error, ValueError, zlib.error) as exc:
        raise StateFormatError(f"{what}: {exc}") from None
    if len(data) != length or not inflater.eof:
        raise StateFormatError(f"{what}: expected {length} bytes")
    return data


def _stamps_bytes(stamps: array) -> bytes:
    """Given an array('Q'), return its bytes in little-endian order."""
    if sys.byteorder == "little":
        return stamps.tobytes()
    swapped = array("Q", stamps)
    swapped.byteswap()
    return swapped.tobytes()


def _stamps_from(data: bytes) -> array:
    """Given little-endian uint64 bytes, return them as an array('Q')."""
    stamps = array("Q")
    stamps.frombytes(data)
    if sys.byteorder != "little":
        stamps.byteswap()
    return stamps


def encode_disk(disk: DiskSegments) -> dict:
    """Given a disk's segments, return its JSON form."""
    return {"target": disk.target, "virtual_size": disk.virtual_size, "segment_size": disk.segment_size,
            "count": disk.count, "chain": disk.chain, "format": disk.format, "image": disk.image,
            "layers": disk.layers, "stamps": _pack(_stamps_bytes(disk.stamps)), "zero": _pack(bytes(disk.zero))}


def _integer(entry: dict, name: str, minimum: int, limit: int) -> int:
    value = entry.get(name)
    if type(value) is not int or not minimum <= value < limit:
        raise StateFormatError(f"{name}: expected a whole number in [{minimum}, {limit})")
    return value


def decode_disk(target: str, entry: object) -> DiskSegments:
    """Given a disk's target and its JSON form, return its DiskSegments; a StateFormatError when any
    field is missing, of the wrong type or inconsistent (count, array lengths)."""
    if not isinstance(entry, dict) or entry.get("target") != target:
        raise StateFormatError(f"disk {target}: expected a mapping naming its target")
    virtual_size = _integer(entry, "virtual_size", 0, 2**63)
    segment_size = _integer(entry, "segment_size", 1, 2**40)
    count = _integer(entry, "count", 0, 2**40)
    chain = _integer(entry, "chain", 0, CHAIN_LIMIT)
    fmt = entry.get("format")
    image = entry.get("image")
    layers = entry.get("layers")
    if not isinstance(fmt, str) or not (image is None or isinstance(image, dict)):
        raise StateFormatError(f"disk {target}: bad format or image")
    if layers is not None and not (isinstance(layers, list) and all(
            isinstance(layer, list) and all(type(n) is int for n in layer) for layer in layers)):
        raise StateFormatError(f"disk {target}: bad layers")
    if count != -(-virtual_size // segment_size):
        raise StateFormatError(f"disk {target}: {count} segments do not cover {virtual_size} bytes")
    stamps = _stamps_from(_unpack(entry.get("stamps"), 8 * count, f"disk {target} stamps"))
    zero = bytearray(_unpack(entry.get("zero"), count, f"disk {target} zero"))
    if zero.translate(None, b"\x00\x01"):
        raise StateFormatError(f"disk {target} zero: flags must be 0 or 1")
    return DiskSegments(target, virtual_size, segment_size, count, chain, stamps, zero, fmt, image, layers)


def encode(state: BitmapState) -> bytes:
    """Given a BitmapState, return the bytes of its state file."""
    return json.dumps({"version": STATE_VERSION, "uuid": state.uuid, "checkpoint": state.checkpoint,
                       "disks": {target: encode_disk(disk) for target, disk in state.disks.items()}},
                      separators=(",", ":")).encode("ascii")


def decode(data: bytes) -> BitmapState:
    """Given a state file's bytes, return its BitmapState; StateFormatError when they are not a
    version-1 state."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StateFormatError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise StateFormatError("expected a JSON object")
    if document.get("version") != STATE_VERSION:
        raise StateFormatError(f"unknown version {document.get('version')!r} (this kvm-borg reads {STATE_VERSION})")
    checkpoint, disks, uuid = document.get("checkpoint"), document.get("disks"), document.get("uuid")
    if not (checkpoint is None or isinstance(checkpoint, str)) or not isinstance(disks, dict) \
            or not isinstance(uuid, str):
        raise StateFormatError("bad checkpoint, disks or uuid")
    return BitmapState(checkpoint, {target: decode_disk(target, entry) for target, entry in disks.items()}, uuid)


# --- the file -------------------------------------------------------------------------------


def load(state_dir: str | os.PathLike, uuid: str) -> BitmapState | None:
    """Given the state dir and a domain UUID, return the domain's BitmapState, or None when it has none;
    a file that cannot be read or is not a valid state for this UUID is logged as a warning naming
    it and treated as absent (the next run reads in full)."""
    return _read(state_path(state_dir, uuid), uuid)


def _read(path: Path, uuid: str) -> BitmapState | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("bitmap state %s cannot be read (%s): treating it as absent, the disks are read in full",
                    path, exc.strerror)
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_FILE:
                raise StateFormatError("not a regular file of a sane size")
            data = handle.read()
        state = decode(data)
        if state.uuid.lower() != uuid.lower():
            raise StateFormatError(f"it belongs to domain {state.uuid}")
    except (OSError, StateFormatError, ValueError) as exc:
        log.warning("bitmap state %s is unusable (%s): treating it as absent, the disks are read in full", path, exc)
        return None
    return state


def save(state_dir: str | os.PathLike, state: BitmapState) -> Path:
    """Given the state dir and a BitmapState (its uuid set), write its state file atomically and durably
    (fsync of the file and of its directory), mode 0600; return the path."""
    return _write(state_path(state_dir, state.uuid), state)


def _write(path: Path, state: BitmapState) -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return atomic.write_atomic(path, encode(state), 0o600)


def _unlink_durably(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    atomic.fsync_dir(path.parent)


def pending_path(state_dir: str | os.PathLike, uuid: str) -> Path:
    """Given the state dir and a domain UUID, return the path of the state a run has not folded yet."""
    path = state_path(state_dir, uuid)
    return path.with_name(f"{uuid.lower()}.pending.json")


def save_pending(state_dir: str | os.PathLike, state: BitmapState) -> Path:
    """Given the state dir and the new BitmapState of a run whose backup job (and checkpoint) exists, write
    it beside the state file as the run's pending state (atomic, fsync'd, 0600), so that whoever ends the
    run (this process, `kvm-borg thaw`, `kvm-borg recover`) can fold it; return the path."""
    return _write(pending_path(state_dir, state.uuid), state)


def fold_pending(state_dir: str | os.PathLike, uuid: str, checkpoint: str | None) -> BitmapState | None:
    """Given the state dir, a domain UUID and the checkpoint its run created, make the run's pending state
    the domain's state (one rename, then an fsync of the directory) and return it; a pending state of
    another checkpoint, or an unusable one, is removed and None returned (the older state stays, which
    only costs reading again what changed since its checkpoint); None as well when there is none."""
    path = pending_path(state_dir, uuid)
    if not os.path.lexists(path):
        return None
    state = _read(path, uuid)
    if state is None or checkpoint is None or state.checkpoint != checkpoint:
        discard_pending(state_dir, uuid)
        return None
    os.replace(path, state_path(state_dir, uuid))
    atomic.fsync_dir(path.parent)
    return state


def discard_pending(state_dir: str | os.PathLike, uuid: str) -> None:
    """Given the state dir and a domain UUID, delete the run's pending state if there is one."""
    _unlink_durably(pending_path(state_dir, uuid))


def remove(state_dir: str | os.PathLike, uuid: str) -> None:
    """Given the state dir and a domain UUID, delete its state file if there is one (durably)."""
    _unlink_durably(state_path(state_dir, uuid))


def layer_identity(paths: list[str]) -> list[list[int]] | None:
    """Given the paths of a disk's image layers (active image first, then its backing files), return
    [[dev, ino, size, ctime_ns], ...] of the files they name (symlinks followed), or None when one is
    not a regular file: a block device's ctime does not change when it is written, so it can never
    be called unchanged. A missing layer is an OSError."""
    identity = []
    for path in paths:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return None
        identity.append([info.st_dev, info.st_ino, info.st_size, info.st_ctime_ns])
    return identity
