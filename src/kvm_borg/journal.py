"""The crash journal: one fsync'd JSON file per domain with overlays (or a backup job) in flight.

An entry is written BEFORE the snapshot names the overlays, updated as each disk is pivoted back,
and removed only when every overlay is merged and deleted. `kvm-borg recover` reads what is left.
A source other than the snapshot engine keeps its own fields in `extra` (the bitmap method: the
checkpoint it creates, its scratch dir, socket and view); entries written before `extra` read as {}.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvm_borg.atomic import fsync_dir, write_atomic
from kvm_borg.errors import KvmBorgError

ENTRY_VERSION = 1
# Entries `kvm-borg freeze` wrote before `owner` existed name it as their source.
LEGACY_FREEZE_SOURCE = "kvm-borg-freeze"


class CorruptEntryError(KvmBorgError):
    """A journal file that cannot be read or does not hold a valid entry; the message names it."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


@dataclass
class JournalDisk:
    """One disk in flight: its base image and the overlay that sits (or will sit) on top."""

    target: str
    base: str
    base_type: str  # "file" | "block"
    base_format: str  # "qcow2" | "raw" ...
    overlay: str
    committed: bool = False  # set once the pivot back onto `base` succeeded


@dataclass
class Entry:
    """A journal entry: which domain, which overlays, how far the run got."""

    domain: str
    uuid: str
    disks: list[JournalDisk]
    source: str = "libvirt-snapshot"  # the FrozenSource plugin that knows how to release it
    stage: str = "planned"  # planned -> snapshot -> storing | exposed -> committing
    owner: str | None = None  # who holds the frozen files until released (FrozenSource.hand_over), if anyone
    extra: dict = field(default_factory=dict)  # source-specific fields (libvirt-bitmap: checkpoint, scratch dir...)
    pid: int = field(default_factory=os.getpid)
    created: float = field(default_factory=time.time)
    version: int = ENTRY_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> "Entry":
        """Given the decoded JSON of an entry, return the Entry; ValueError/TypeError if malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("disks"), list):
            raise ValueError("not a journal entry (no list of disks)")
        data = dict(data)
        if "owner" not in data and data.get("source") == LEGACY_FREEZE_SOURCE:  # written before `owner` existed
            data.update(source="libvirt-snapshot", owner=LEGACY_FREEZE_SOURCE)
        disks = []
        for disk in data.pop("disks"):
            if not isinstance(disk, dict):
                raise ValueError("a disk is not an object")
            disks.append(JournalDisk(**disk))
            for name in ("target", "base", "base_type", "base_format", "overlay"):
                if not isinstance(getattr(disks[-1], name), str):
                    raise ValueError(f"disk field {name!r} is not a string")
        entry = cls(disks=disks, **data)
        for name in ("domain", "uuid", "source", "stage"):
            if not isinstance(getattr(entry, name), str):
                raise ValueError(f"field {name!r} is not a string")
        if entry.owner is not None and not isinstance(entry.owner, str):
            raise ValueError("field 'owner' is not a string")
        if not isinstance(entry.extra, dict):
            raise ValueError("field 'extra' is not an object")
        if not isinstance(entry.created, (int, float)) or isinstance(entry.created, bool):
            raise ValueError("field 'created' is not a number")
        return entry


def entry_path(journal_dir: Path, uuid: str) -> Path:
    """Given the journal dir and a domain UUID, return the entry's file path."""
    return journal_dir / f"{uuid}.json"


def write_entry(journal_dir: Path, entry: Entry) -> Path:
    """Given an Entry, write it atomically and durably (temp file, fsync, rename, fsync dir)."""
    journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = entry_path(journal_dir, entry.uuid)
    return write_atomic(path, json.dumps(asdict(entry), indent=2, ensure_ascii=False).encode("utf-8"), 0o600)


def load_entry(path: Path) -> Entry:
    """Given an entry's file, return its Entry; CorruptEntryError (naming the file) if it cannot be
    read or is not a valid entry of the domain its name says. FileNotFoundError passes through."""
    try:
        entry = Entry.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise CorruptEntryError(f"journal entry {path} is unreadable or corrupt: {exc}", path) from None
    if entry.uuid != path.stem:
        raise CorruptEntryError(f"journal entry {path} names another domain UUID ({entry.uuid})", path)
    return entry


def read_entry(journal_dir: Path, uuid: str) -> Entry | None:
    """Given a domain UUID, return its pending Entry or None; CorruptEntryError if it is unreadable."""
    try:
        return load_entry(entry_path(journal_dir, uuid))
    except FileNotFoundError:
        return None


def scan_entries(journal_dir: Path) -> tuple[list[Entry], list[CorruptEntryError]]:
    """Return (every readable pending Entry, oldest first; one CorruptEntryError per unreadable file)."""
    if not journal_dir.is_dir():
        return [], []
    entries, corrupt = [], []
    for path in sorted(journal_dir.glob("*.json")):
        try:
            entries.append(load_entry(path))
        except FileNotFoundError:  # completed meanwhile
            continue
        except CorruptEntryError as exc:
            corrupt.append(exc)
    return sorted(entries, key=lambda e: e.created), corrupt


def list_entries(journal_dir: Path) -> list[Entry]:
    """Return every readable pending Entry, oldest first; unreadable ones are logged and left out
    (`kvm-borg recover` reports them and exits 2)."""
    entries, corrupt = scan_entries(journal_dir)
    for exc in corrupt:
        logging.getLogger(__name__).warning("%s", exc)
    return entries


def remove_entry(journal_dir: Path, uuid: str) -> None:
    """Delete a domain's entry durably (no error when it is already gone)."""
    try:
        entry_path(journal_dir, uuid).unlink()
    except FileNotFoundError:
        return
    fsync_dir(journal_dir)
