"""Reading what borg prints: its `--log-json` stderr records, its JSON on stdout, `prune --list` lines and the
tar of a few small stored files (`export-tar`).

Pure: text goes in, records and values come out; nothing here runs borg.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timezone
from typing import Any

from kvm_borg.execute import one_line
from kvm_borg.metadata import archive_method, parse_archive_comment
from kvm_borg.models import ArchiveInfo

logger = logging.getLogger(__name__)

# msgids of `borg list` meaning "there is no repository here".
NO_REPOSITORY_MSGIDS = frozenset({"Repository.DoesNotExist", "Repository.InvalidRepository"})
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b.*$", re.MULTILINE)
_VERSION = re.compile(r"\bborg(?:\.exe)? (\d+\.\d+\.\d+\S*)")
# `borg list --json-lines` item types -> kvm-borg's entry kinds.
_ITEM_KINDS = {"-": "file", "d": "dir", "l": "symlink", "h": "hardlink", "b": "device", "c": "device",
               "p": "fifo", "s": "socket"}
# One line of `borg prune --list`: "{action:<44} {archive:<36} {time} [{id}]".
_PRUNE_LINE = re.compile(
    r"^(?P<action>Would prune:|Pruning archive \(\d+/\d+\):|Keeping checkpoint archive:"
    r"|Keeping archive \(rule: (?P<rule>[^#]+?) #\d+\):)\s+(?P<name>.+?)\s+"
    r"\w{3}, \d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[[0-9a-f]{64}\]\s*$"
)
# borg's rule names -> kvm-borg's (keep_last is borg's keep-secondly).
_BORG_RULES = {"within": "keep_within", "secondly": "keep_last", "minutely": "keep_minutely",
               "hourly": "keep_hourly", "daily": "keep_daily", "weekly": "keep_weekly",
               "monthly": "keep_monthly", "yearly": "keep_yearly"}


def failed(returncode: int) -> bool:
    """Given a borg exit code, return whether the command failed (1 is success with warnings)."""
    return returncode < 0 or returncode >= 2


def parse_version(text: str) -> str | None:
    """Given the output of `borg --version` ("borg 1.4.0"), return the version ("1.4.0"), or None if unreadable."""
    match = _VERSION.search(text)
    return match.group(1) if match else None


def archive_info_from(entry: Mapping[str, Any], repository: str, domain: str | None = None) -> ArchiveInfo | None:
    """Given one archive of `borg info --json`, return its ArchiveInfo, or None if it is not kvm-borg's (or not `domain`'s)."""
    meta = parse_archive_comment(entry.get("comment"))
    if meta is None or (domain is not None and meta["domain"] != domain):
        return None
    stats = entry.get("stats") or {}
    disks = meta.get("disks") or []
    return ArchiveInfo(
        name=entry["name"],
        domain=meta["domain"],
        time=utc_iso(entry.get("start") or entry.get("time") or ""),
        repository=repository,
        original_size=stats.get("original_size"),
        deduplicated_size=stats.get("deduplicated_size"),
        disks=tuple(d["target"] if isinstance(d, dict) and "target" in d else str(d) for d in disks),
        host=meta.get("host"),
        method=archive_method(meta),
    )


def is_foreign(entry: Mapping[str, Any], domain: str) -> bool:
    """Given one archive of `borg list --json --format {comment}` and a domain, return whether kvm-borg did not
    make it for that domain (no kvm-borg comment, or another domain's)."""
    return (parse_archive_comment(entry.get("comment")) or {}).get("domain") != domain


def utc_iso(borg_time: str) -> str:
    """Given a borg JSON time (naive, UTC because we run borg with TZ=UTC), return ISO 8601 with its offset."""
    try:
        return datetime.fromisoformat(borg_time).replace(tzinfo=timezone.utc).isoformat(timespec="seconds")
    except ValueError:
        return borg_time


def parse_create_stats(stdout: str) -> tuple[int, int] | None:
    """Given `borg create --json` stdout, return (original_size, deduplicated_size), or None if unreadable."""
    try:
        stats = json.loads(stdout)["archive"]["stats"]
        return int(stats["original_size"]), int(stats["deduplicated_size"])
    except (ValueError, KeyError, TypeError):
        return None


def parse_items(stdout: str) -> list[dict]:
    """Given `borg list --json-lines` stdout, return its items (each a dict with a `path`), in order.

    A line that is not such a JSON object is a ValueError."""
    items = []
    for line in stdout.splitlines():
        if line.strip():
            item = json.loads(line)
            if not isinstance(item, dict) or "path" not in item:
                raise ValueError("not an item")
            items.append(item)
    return items


def entry_kind(item: Mapping[str, Any]) -> str:
    """Given one `borg list --json-lines` item, return its kind: file, dir, symlink, hardlink, device, fifo,
    socket or other (borg 1.x lists a hard link to an earlier item as a file with a `source`)."""
    kind = _ITEM_KINDS.get(item.get("type"), "other")
    return "hardlink" if kind == "file" and item.get("source") else kind


def parse_prune_line(line: str) -> tuple[str, str, str | None] | None:
    """Given one line of `borg prune --list`, return (kept|pruned, archive, rule) or None if it is no such line."""
    match = _PRUNE_LINE.match(line)
    if not match:
        return None
    action, name = match.group("action"), match.group("name")
    if action.startswith("Keeping archive"):
        rule = match.group("rule")
        base, oldest = (rule[:-len("[oldest]")], True) if rule.endswith("[oldest]") else (rule, False)
        ours = _BORG_RULES.get(base, base)
        return "kept", name, f"{ours} (oldest)" if oldest else ours
    if action.startswith("Keeping checkpoint"):
        return "kept", name, "checkpoint"
    return "pruned", name, None


# msgids of borg 1.4's warnings that a file's data could not be read into the archive (borg.helpers.errors:
# a BackupError wrapped in a BackupWarning), e.g. an I/O error in the middle of an image or a segment: the
# archive holds the file, incomplete. (A file that is gone, BackupFileNotFoundError, is only missing from
# the archive: a warning, as before.)
UNREAD_FILE_MSGIDS = frozenset({"BackupError", "BackupOSError", "BackupPermissionError", "BackupIOError",
                                "BackupRaceConditionError"})


class BorgLog:
    """Given borg's `--log-json` stderr lines one at a time, log them and keep what results need."""

    def __init__(self, on_progress: Callable[[int], None] | None = None):
        self.on_progress = on_progress
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.msgids: list[str] = []
        self.tracebacks: list[str] = []
        self.other_lines: list[str] = []
        self.refused: list[str] = []  # questions borg asked that our environment answered "no"
        self.list_lines: list[str] = []  # `--list` output (borg.output.list), e.g. of prune
        self.unread_files: list[str] = []  # warnings that a file could not be read (UNREAD_FILE_MSGIDS)
        self._question = ""

    def feed(self, line: str) -> None:
        """Given one stderr line, record it (a JSON record of borg's, or a plain line)."""
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.other_lines.append(line)
            logger.info("borg: %s", line)
            return
        kind = record.get("type")
        if kind == "archive_progress":
            if self.on_progress is not None and "original_size" in record:
                self.on_progress(int(record["original_size"]))
        elif kind == "log_message":
            self._log_message(record)
        elif kind == "question_prompt":
            self._question = (str(record.get("message", "")).strip().splitlines() or [""])[0]
            logger.debug("borg asks: %s", record.get("message"))
        elif kind == "question_accepted_false":
            self.refused.append(f"{self._question or 'a question'} Answered no by {record.get('msgid')}=no")
        else:  # progress_message, progress_percent, file_status
            logger.debug("borg: %s", record.get("message") or record)

    def _log_message(self, record: Mapping[str, Any]) -> None:
        message = str(record.get("message", "")).strip()
        level = record.get("levelname", "INFO")
        if record.get("msgid"):
            self.msgids.append(record["msgid"])
            if record["msgid"] in UNREAD_FILE_MSGIDS:
                self.unread_files.append(one_line(message))
        if record.get("name") == "borg.output.list":
            self.list_lines.append(message)
        if level in ("ERROR", "CRITICAL"):
            if message.startswith("Traceback"):
                self.tracebacks.append(message)
            else:
                self.errors.append(one_line(message.splitlines()[0] if message else ""))
            logger.debug("borg: %s", message)  # the caller reports the error itself
        elif level == "WARNING" and (_is_new_files_cache(message) or "KEY AND PASSPHRASE" in message):
            # expected on a first run / `borg init`'s key advice (kvm-borg gives its own): not a problem
            logger.info("borg: %s", message)
        elif level == "WARNING":
            self.warnings.append(one_line(message))
            logger.warning("borg: %s", message)
        else:
            logger.log(logging.DEBUG if level == "DEBUG" else logging.INFO, "borg: %s", message)

    def error_message(self, returncode: int | None) -> str:
        """Given borg's exit code, return one line saying why it failed, with the remote side's reason if any."""
        if self.errors:
            message = self.errors[0]
            if message in ("Local Exception", "Remote Exception") and self.tracebacks:
                found = _EXCEPTION_LINE.findall(self.tracebacks[-1])
                if found:
                    message = f"{message}: {found[-1]}"
        elif self.other_lines:
            message = one_line(self.other_lines[-1])
        elif returncode is not None and returncode < 0:
            message = f"borg was killed by signal {-returncode}"
        else:
            message = f"borg exited with code {returncode}"
        if self.refused:
            message = f"{message} ({self.refused[-1]})"
        remote = [w for w in self.warnings if w.startswith("Remote:")]
        if remote and remote[-1] not in message:
            message = f"{message} ({remote[-1]})"
        return one_line(message)


def _is_new_files_cache(message: str) -> bool:
    """Given a borg warning, return whether it only says a domain's files cache does not exist yet.

    Borg says so on the first backup of each domain (see environment.files_cache_suffix); that is expected."""
    return "files cache" in message and (
        "No such file or directory" in message or message.startswith("Continuing without files cache")
    )


def parse_files_tar(data: bytes, wanted: Collection[str], limit: int, archive: str) -> dict[str, bytes]:
    """Given an uncompressed tar (borg export-tar of stored files), the archive paths asked for, a size limit
    per file and the archive's name (for messages), return {path: bytes} of its members that were asked for
    and are regular files (others are left out: the caller refuses what is missing). A member larger than
    `limit` is a ValueError worded as the one-file read words it; an unreadable tar is a ValueError."""
    wanted = {str(p).lstrip("/") for p in wanted}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                name = member.name.lstrip("/")
                if name not in wanted or not member.isreg():
                    continue
                if member.size > limit:
                    raise ValueError(f"{name} in {archive} is larger than {limit} bytes")
                handle = tar.extractfile(member)
                found[name] = handle.read() if handle is not None else b""
    except tarfile.TarError as exc:
        raise ValueError(f"borg export-tar of {archive} printed an unreadable tar ({exc})") from None
    return found
