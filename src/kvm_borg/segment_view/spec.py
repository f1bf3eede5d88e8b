"""The segment view's spec: what the parent writes (JSON) and `python -m kvm_borg.segment_view` serves.

PURE: dataclasses, their JSON form, and its validation. Two kinds:

- `nbd` (backup): per disk an NBD export (unix socket + export name) shown as a directory
  `<target>/` of segment files `%08d` plus `manifest.json`. A segment's attributes come from the
  spec: inode `segments.segment_inode(chain, disk_index, index)`, mtime = ctime = its stamp (ns),
  size 0 when its zero flag is set, else its length. Directories and manifest.json carry `now_ns`,
  the newest time in the view (>= every stamp; borg forgets a file memorized with a time >= the
  newest one of its run, so the parent gives `now_ns` > the run's stamp). `run_stamp`, when set, is
  the stamp of the segments changed in this run: the view fetches the next of them ahead of the
  reader (the others the reader skips).
- `files` (mount, live restore): per disk a directory of segment files (e.g. inside a borg or
  restic mount) shown as ONE flat image `<target>.raw` of `virtual_size` bytes; a 0-byte segment
  reads as zeros.

Stamps and zero flags travel inline, zlib-compressed and base64 (little-endian uint64 per segment;
one byte per segment): ~9 bytes per segment before compression, a few hundred bytes when most
segments share a stamp.
"""

from __future__ import annotations

import base64
import binascii
import sys
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

from kvm_borg.errors import UsageError
from kvm_borg.segments import segment_count

SPEC_FORMAT = 1
KINDS = ("nbd", "files")
#: mountinfo's type for a view (`fuse.<subtype>`): stop_leftover unmounts only these.
FS_SUBTYPE = "kvm-borg-view"
MAX_CONNECTIONS = 16


class SpecError(UsageError):
    """The spec is malformed; the message names the key."""


@dataclass(frozen=True)
class NbdDisk:
    """One disk of an `nbd` view: where to read it and every segment's attributes."""

    target: str
    socket: str  # unix socket of the NBD server
    export: str  # export name (libvirt: the disk target)
    virtual_size: int
    segment_size: int
    chain: int  # 32-bit chain id, part of every segment inode
    disk_index: int  # part of every segment inode
    stamps: array  # array('Q'): per segment, ns of the run it last changed in
    zero: bytes  # per segment 1 = reads as zeros (shown as 0 bytes), else 0
    manifest: dict  # written as <target>/manifest.json (segments.manifest(disk))
    connections: int = 2  # NBD connections the view may open (qemu-nbd: its -e must allow them)

    @property
    def count(self) -> int:
        return len(self.stamps)


@dataclass(frozen=True)
class FilesDisk:
    """One disk of a `files` view: a directory of segment files shown as `<target>.raw`."""

    target: str
    directory: str
    virtual_size: int
    segment_size: int


@dataclass(frozen=True)
class ViewSpec:
    """What one view process serves at `mountpoint`."""

    kind: str  # "nbd" | "files"
    mountpoint: str
    disks: tuple = ()  # NbdDisk... or FilesDisk...
    now_ns: int = 0  # nbd: ctime/mtime of directories and manifest.json
    run_stamp: int | None = None  # nbd: the stamp of the segments changed in this run (fetched ahead)
    allow_other: bool = False  # let other users (QEMU's) read the view
    owner: tuple[int, int] = (0, 0)  # (uid, gid) of every file and directory
    workers: int = 4  # files kind: reader threads


def status_path(spec_path: Path) -> Path:
    """Given the spec's path, return the file the view reports its start in (`ready PID` / `error: ...`)."""
    return spec_path.with_name(spec_path.name + ".status")


def stats_path(spec_path: Path) -> Path:
    """Given the spec's path, return where the view writes its stats on exit (stats.json beside it)."""
    return spec_path.with_name("stats.json")


# --- inline arrays ---------------------------------------------------------------------------


def pack_stamps(stamps: array) -> str:
    """Given an array('Q') of stamps, return its inline form (little-endian, zlib, base64)."""
    data = array("Q", stamps)
    if sys.byteorder != "little":
        data.byteswap()
    return base64.b64encode(zlib.compress(data.tobytes(), 6)).decode("ascii")


def unpack_stamps(text: str, count: int) -> array:
    """Given the inline form of `count` stamps, return the array('Q'); SpecError when it is not that."""
    raw = _unpack(text, "stamps")
    if len(raw) != 8 * count:
        raise SpecError(f"spec: 'stamps' holds {len(raw) // 8} stamps, the disk has {count} segments")
    stamps = array("Q")
    stamps.frombytes(raw)
    if sys.byteorder != "little":
        stamps.byteswap()
    return stamps


def pack_zero(zero: bytes | bytearray) -> str:
    """Given the per-segment zero flags (one byte each, 0 or 1), return their inline form."""
    return base64.b64encode(zlib.compress(bytes(zero), 6)).decode("ascii")


def unpack_zero(text: str, count: int) -> bytes:
    """Given the inline form of `count` zero flags, return them as bytes of 0/1; SpecError otherwise."""
    raw = _unpack(text, "zero")
    if len(raw) != count:
        raise SpecError(f"spec: 'zero' holds {len(raw)} flags, the disk has {count} segments")
    if raw.translate(None, b"\x00\x01"):
        raise SpecError("spec: 'zero' flags must be 0 or 1")
    return raw


def _unpack(text, key: str) -> bytes:
    if not isinstance(text, str):
        raise SpecError(f"spec: {key!r} must be a string")
    try:
        return zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (binascii.Error, zlib.error, UnicodeEncodeError, ValueError):
        raise SpecError(f"spec: {key!r} is not base64 of zlib data") from None


# --- JSON form -------------------------------------------------------------------------------


def to_json(spec: ViewSpec) -> dict:
    """Given a ViewSpec, return its JSON form (what `python -m kvm_borg.segment_view` reads)."""
    data = {"kvm_borg_view": SPEC_FORMAT, "kind": spec.kind, "mountpoint": spec.mountpoint,
            "now_ns": spec.now_ns, "run_stamp": spec.run_stamp, "allow_other": spec.allow_other, "owner": list(spec.owner),
            "workers": spec.workers, "disks": []}
    for disk in spec.disks:
        if isinstance(disk, NbdDisk):
            data["disks"].append({
                "target": disk.target, "socket": disk.socket, "export": disk.export,
                "virtual_size": disk.virtual_size, "segment_size": disk.segment_size, "chain": disk.chain,
                "disk_index": disk.disk_index, "count": disk.count, "stamps": pack_stamps(disk.stamps),
                "zero": pack_zero(disk.zero), "manifest": disk.manifest, "connections": disk.connections,
            })
        else:
            data["disks"].append({"target": disk.target, "directory": disk.directory,
                                  "virtual_size": disk.virtual_size, "segment_size": disk.segment_size})
    return data


def _get(data: dict, key: str, kind, where: str = "spec", *, default=..., check=None):
    if key not in data:
        if default is ...:
            raise SpecError(f"{where}: {key!r} is missing")
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}")
    if check is not None and not check(value):
        raise SpecError(f"{where}: {key!r} is out of range: {value!r}")
    return value


def _target(data: dict, where: str) -> str:
    target = _get(data, "target", str, where)
    if not target or "/" in target or target in (".", "..") or "\0" in target or target.startswith("."):
        raise SpecError(f"{where}: 'target' is not a plain name: {target!r}")
    return target


def _positive(value: int) -> bool:
    return value > 0


def parse(data) -> ViewSpec:
    """Given the JSON form (a parsed dict), return the ViewSpec; anything malformed is a SpecError
    naming the key (sizes positive, targets plain and unique, arrays of exactly `count` segments,
    `now_ns` >= every stamp)."""
    if not isinstance(data, dict):
        raise SpecError("spec: not a JSON object")
    if data.get("kvm_borg_view") != SPEC_FORMAT:
        raise SpecError(f"spec: 'kvm_borg_view' must be {SPEC_FORMAT}")
    kind = _get(data, "kind", str)
    if kind not in KINDS:
        raise SpecError(f"spec: 'kind' must be one of {', '.join(KINDS)}, not {kind!r}")
    mountpoint = _get(data, "mountpoint", str, check=lambda p: p.startswith("/"))
    now_ns = _get(data, "now_ns", int, default=0, check=lambda v: 0 <= v < 2**64)
    run_stamp = data.get("run_stamp")
    if run_stamp is not None and (not isinstance(run_stamp, int) or isinstance(run_stamp, bool)
                                  or not 0 <= run_stamp <= now_ns):
        raise SpecError("spec: 'run_stamp' must be null or an int in [0, now_ns]")
    owner = _get(data, "owner", list, default=[0, 0])
    if len(owner) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in owner):
        raise SpecError("spec: 'owner' must be [uid, gid]")
    disks_data = _get(data, "disks", list, check=bool)
    disks = []
    for n, item in enumerate(disks_data):
        where = f"spec: disks[{n}]"
        if not isinstance(item, dict):
            raise SpecError(f"{where}: not an object")
        target = _target(item, where)
        virtual_size = _get(item, "virtual_size", int, where, check=_positive)
        segment_size = _get(item, "segment_size", int, where, check=_positive)
        if kind == "files":
            directory = _get(item, "directory", str, where, check=lambda p: p.startswith("/"))
            disks.append(FilesDisk(target, directory, virtual_size, segment_size))
            continue
        count = _get(item, "count", int, where)
        if count != segment_count(virtual_size, segment_size):
            raise SpecError(f"{where}: 'count' {count} does not match virtual_size/segment_size")
        stamps = unpack_stamps(item.get("stamps"), count)
        if stamps and max(stamps) > now_ns:
            raise SpecError(f"{where}: a stamp is newer than 'now_ns'")
        disks.append(NbdDisk(
            target=target, socket=_get(item, "socket", str, where, check=lambda p: p.startswith("/")),
            export=_get(item, "export", str, where),
            virtual_size=virtual_size, segment_size=segment_size,
            chain=_get(item, "chain", int, where, check=lambda v: 0 <= v < 2**32),
            disk_index=_get(item, "disk_index", int, where, check=lambda v: 0 <= v < 2**16),
            stamps=stamps, zero=unpack_zero(item.get("zero"), count),
            manifest=_get(item, "manifest", dict, where),
            connections=_get(item, "connections", int, where, default=2,
                             check=lambda v: 1 <= v <= MAX_CONNECTIONS),
        ))
    targets = [disk.target for disk in disks]
    if len(set(targets)) != len(targets):
        raise SpecError("spec: two disks have the same target")
    return ViewSpec(kind=kind, mountpoint=mountpoint, disks=tuple(disks), now_ns=now_ns, run_stamp=run_stamp,
                    allow_other=_get(data, "allow_other", bool, default=False), owner=(owner[0], owner[1]),
                    workers=_get(data, "workers", int, default=4, check=lambda v: 1 <= v <= 64))
