"""How a kvm-borg archive maps onto restic snapshots: their tags, and grouping snapshots back into archives.

Pure: tags and `restic snapshots --json` entries go in, tags, ArchiveParts and ArchiveInfos come
out; nothing here runs restic. See docs/repositories.md for why:

- one archive = one *main* snapshot (tag `part=main`: meta.json, both XMLs and the file
  images, at their absolute host paths) plus, for each block-device disk, one *device*
  snapshot (tag `part=device`) whose only file is the device's content, read through
  `--stdin` and stored under the device's path (`--stdin-filename`), so the layout matches
  borg's. restic cannot add a second `backup` to a snapshot, hence the parts;
- every part carries the tags `kvm-borg`, `domain=<name>`, `archive=<archive name>`,
  `comment=<base64url of the archive comment>`, the same `--host` and the same `--time`;
- the main snapshot is written last: an archive exists only once its main snapshot does,
  so device parts left by an interrupted run are never listed as a backup.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kvm_borg.metadata import archive_method, parse_archive_comment
from kvm_borg.models import ArchiveInfo

MARKER_TAG = "kvm-borg"
PART_MAIN = "main"
PART_DEVICE = "device"

_TIME_FRACTION = re.compile(r"(\.\d+)")



def escape_tag_value(value: str) -> str:
    """Given a tag value, return it safe for restic's `--tag` (which splits on "," and trims spaces).

    "%", ",", control characters and leading/trailing whitespace are percent-encoded; the
    rest (spaces inside, non-ASCII) stays readable in `restic snapshots`."""
    out = []
    for index, char in enumerate(value):
        edge = index == 0 or index == len(value) - 1
        if char in "%," or ord(char) < 32 or ord(char) == 127 or (edge and char.isspace()):
            out.append("".join(f"%{byte:02X}" for byte in char.encode("utf-8")))
        else:
            out.append(char)
    return "".join(out)


def unescape_tag_value(value: str) -> str:
    """Given an escaped tag value, return the original."""
    return re.sub(
        r"(?:%[0-9A-Fa-f]{2})+",
        lambda m: bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8", "replace"),
        value,
    )


def encode_comment(comment: str) -> str:
    """Given the archive comment (one-line JSON), return it as a tag value (base64url, no padding)."""
    return base64.urlsafe_b64encode(comment.encode("utf-8")).decode("ascii").rstrip("=")


def decode_comment(value: str) -> str | None:
    """Given a `comment=` tag value, return the archive comment, or None if it is not decodable."""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def tag(key: str, value: str) -> str:
    """Given a tag key and a value, return the tag `key=value` with the value escaped for `--tag`."""
    return f"{key}={escape_tag_value(value)}"


def archive_tags(domain: str, archive: str, comment: str, part: str, size: int | None = None) -> tuple[str, ...]:
    """Given an archive's domain, name, comment, a part (main/device) and the main part's total size, return its tags."""
    return (
        MARKER_TAG,
        tag("domain", domain),
        tag("archive", archive),
        f"part={part}",
        f"comment={encode_comment(comment)}",
    ) + ((f"size={size}",) if size is not None else ())


def parse_tags(tags: Iterable[str]) -> dict[str, str]:
    """Given a snapshot's tags, return {key: unescaped value} of the `key=value` ones (first wins)."""
    result: dict[str, str] = {}
    for item in tags or ():
        key, sep, value = str(item).partition("=")
        if sep and key not in result:
            result[key] = value if key == "comment" else unescape_tag_value(value)
    return result




# --- snapshots back into archives -------------------------------------------------------------


def utc_iso(restic_time: str) -> str:
    """Given a restic JSON time (RFC 3339, nanoseconds), return ISO 8601 in UTC to the second, like the borg backend."""
    text = _TIME_FRACTION.sub("", restic_time, count=1).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text).astimezone(timezone.utc).isoformat(timespec="seconds")
    except ValueError:
        return restic_time


@dataclass
class ArchiveParts:
    """The snapshots of one archive: its main snapshot (None while incomplete) and its device snapshots."""

    archive: str
    host: str
    main: dict | None = None
    devices: list[dict] = field(default_factory=list)

    @property
    def snapshots(self) -> list[dict]:
        """The archive's snapshots: the device parts, then the main one if there is one."""
        return self.devices + ([self.main] if self.main else [])

    def snapshot_holding(self, archive_path: str) -> dict:
        """Given a stored path, return the snapshot that holds it: the device part stored under that path,
        else the main snapshot."""
        for snapshot in self.devices:
            if archive_path in (snapshot.get("paths") or []):
                return snapshot
        return self.main  # type: ignore[return-value]


def group_archives(snapshots: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], ArchiveParts]:
    """Given `restic snapshots --json` entries, return {(host, archive): ArchiveParts} of kvm-borg's snapshots."""
    groups: dict[tuple[str, str], ArchiveParts] = {}
    for snapshot in snapshots:
        tags = snapshot.get("tags") or []
        if MARKER_TAG not in tags:
            continue
        values = parse_tags(tags)
        archive, part = values.get("archive"), values.get("part")
        if not archive or part not in (PART_MAIN, PART_DEVICE):
            continue
        host = str(snapshot.get("hostname", ""))
        parts = groups.setdefault((host, archive), ArchiveParts(archive, host))
        if part == PART_MAIN:
            parts.main = dict(snapshot)
        else:
            parts.devices.append(dict(snapshot))
    return groups


def archive_info_from(parts: ArchiveParts, repository: str, domain: str | None = None) -> ArchiveInfo | None:
    """Given an archive's snapshots, return its ArchiveInfo, or None if it is incomplete or not kvm-borg's (or not `domain`'s)."""
    if parts.main is None:
        return None
    values = parse_tags(parts.main.get("tags") or [])
    meta = parse_archive_comment(decode_comment(values.get("comment", "")))
    if meta is None or (domain is not None and meta["domain"] != domain):
        return None
    size = values.get("size")
    summaries = [s.get("summary") for s in parts.snapshots]  # restic 0.17+ keeps backup statistics
    added = sum(int(s.get("data_added", 0)) for s in summaries) if all(isinstance(s, dict) for s in summaries) else None
    disks = meta.get("disks") or []
    return ArchiveInfo(
        name=parts.archive,
        domain=meta["domain"],
        time=utc_iso(str(parts.main.get("time", ""))),
        repository=repository,
        original_size=int(size) if size and size.isdigit() else None,
        deduplicated_size=added,
        disks=tuple(d["target"] if isinstance(d, dict) and "target" in d else str(d) for d in disks),
        host=parts.host or meta.get("host"),
        method=archive_method(meta),
    )
