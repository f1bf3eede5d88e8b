"""The crash journal: one fsync'd JSON file per domain with overlays in flight.

An entry is written BEFORE the snapshot names the overlays, updated as each disk is pivoted back,
and removed only when every overlay is merged and deleted. `kvm-borg recover` reads what is left.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvm_borg.atomic import write_atomic

ENTRY_VERSION = 1


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
    source: str = "libvirt-snapshot"  # the plugin that knows how to recover it
    stage: str = "planned"  # planned -> snapshot -> stored -> committing
    pid: int = field(default_factory=os.getpid)
    created: float = field(default_factory=time.time)
    version: int = ENTRY_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> "Entry":
        disks = [JournalDisk(**d) for d in data.pop("disks")]
        return cls(disks=disks, **data)


def entry_path(journal_dir: Path, uuid: str) -> Path:
    """Given the journal dir and a domain UUID, return the entry's file path."""
    return journal_dir / f"{uuid}.json"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_entry(journal_dir: Path, entry: Entry) -> Path:
    """Given an Entry, write it atomically and durably (temp file, fsync, rename, fsync dir)."""
    journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = entry_path(journal_dir, entry.uuid)
    return write_atomic(path, json.dumps(asdict(entry), indent=2, ensure_ascii=False).encode("utf-8"), 0o600)


def read_entry(journal_dir: Path, uuid: str) -> Entry | None:
    """Given a domain UUID, return its pending Entry or None."""
    path = entry_path(journal_dir, uuid)
    try:
        return Entry.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None


def list_entries(journal_dir: Path) -> list[Entry]:
    """Return every pending Entry, oldest first."""
    if not journal_dir.is_dir():
        return []
    entries = [
        Entry.from_dict(json.loads(p.read_text(encoding="utf-8"))) for p in journal_dir.glob("*.json")
    ]
    return sorted(entries, key=lambda e: e.created)


def remove_entry(journal_dir: Path, uuid: str) -> None:
    """Delete a domain's entry durably (no error when it is already gone)."""
    try:
        entry_path(journal_dir, uuid).unlink()
    except FileNotFoundError:
        return
    _fsync_dir(journal_dir)
