"""Reading what restic prints: `backup --json` records, stderr lines and `ls --json` nodes.

Pure: text goes in, records and one-line messages come out; nothing here runs restic.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvm_borg.execute import one_line

logger = logging.getLogger(__name__)

# What restic says when there is no repository at the URL / when the password is wrong (before 0.17's exit codes).
NO_REPOSITORY = ("Is there a repository at the following location?", "repository does not exist")
WRONG_PASSWORD = ("wrong password",)


class BackupOutput:
    """Given `restic backup --json` stdout chunks, report progress and keep the summary and errors."""

    def __init__(self, on_bytes: Callable[[int], None] | None = None):
        self.on_bytes = on_bytes
        self.summary: dict | None = None
        self.errors: list[str] = []
        self._pending = b""

    def feed(self, data: bytes) -> None:
        """Given the next chunk of stdout, handle every line it completes."""
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            self._line(line)

    def close(self) -> None:
        """Handle the last line if stdout did not end with a newline."""
        if self._pending:
            self._line(self._pending)
            self._pending = b""

    def _line(self, raw: bytes) -> None:
        try:
            record = json.loads(raw)
        except ValueError:
            if raw.strip():
                logger.debug("restic: %s", raw.decode("utf-8", "replace"))
            return
        if not isinstance(record, dict):
            return
        kind = record.get("message_type")
        if kind == "status":
            if self.on_bytes is not None and "bytes_done" in record:
                self.on_bytes(int(record["bytes_done"]))
        elif kind == "summary":
            self.summary = record
        elif kind == "error":
            self.errors.append(json_error(record))
        else:
            logger.debug("restic: %s", record)


# restic's notice when the server refuses to delete a file and restic means to retry (an append-only
# server: rest-server --append-only, `rclone serve restic --append-only`), e.g. "Remove(<snapshot/07928e9958>)
# returned error, retrying after 552.33ms: blob not removed, server response: 403 Forbidden (403)".
# restic 0.14 retries it ten times, ~45 s, before it fails.
_REFUSED_REMOVE = re.compile(r"^Remove\(<(\w+)/[0-9a-f]*>\) returned error\b.*\b403 Forbidden\b")
APPEND_ONLY_REFUSAL = ("the server refused to delete ({kind}: 403 Forbidden): the repository is append-only; "
                       "forget and prune on the server (see docs/repositories.md)")


def refused_delete(line: str) -> str | None:
    """Given one restic stderr line, return the kind of file ("snapshot", "data", ...) whose deletion the
    server refused with 403 Forbidden, or None if the line says nothing of the kind."""
    match = _REFUSED_REMOVE.match(line.strip())
    return match.group(1) if match else None


def json_error(record: Mapping[str, Any]) -> str:
    """Given a restic JSON error record, return it as one line ("item: message")."""
    error = record.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    item = record.get("item")
    return one_line(f"{item}: {message}" if item else str(message))


class ResticLog:
    """Given restic's stderr lines one at a time, log them and keep what error messages need."""

    def __init__(self):
        self.lines: list[str] = []

    def feed(self, line: str) -> None:
        """Given one stderr line (plain, or a JSON error record), record it."""
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("message_type") == "error":
            line = json_error(record)
        self.lines.append(line)
        logger.debug("restic: %s", line)

    def says(self, phrases: Sequence[str]) -> bool:
        """Given phrases, return whether any stderr line so far contains one of them."""
        return any(phrase in line for line in self.lines for phrase in phrases)

    def lost_ssh_reason(self) -> bool:
        """Return whether the sftp session failed without ssh's own message (restic may exit before passing it on)."""
        return self.says(("sftp session",)) and not self.says(("subprocess ssh:",))

    def error_message(self, returncode: int | None) -> str:
        """Given restic's exit code, return one line saying why it failed, with ssh's reason if ssh said one."""
        fatal = [line for line in self.lines if line.startswith("Fatal:")]
        if fatal:
            message = fatal[-1][len("Fatal:"):].strip()
        elif self.lines:
            message = self.lines[-1]
        elif returncode is not None and returncode < 0:
            message = f"restic was killed by signal {-returncode}"
        else:
            message = f"restic exited with code {returncode}"
        ssh = [line for line in self.lines if line.startswith("subprocess ssh:")]
        if ssh and ssh[-1] not in message:
            message = f"{message} ({ssh[-1][len('subprocess '):]})"
        if self.says(NO_REPOSITORY) and "no repository" not in message:
            message = f"{message} (no repository there: run `kvm-borg init`)"
        return one_line(message)


def parse_ls_nodes(stdout: str) -> list[dict]:
    """Given `restic ls --json` stdout, return its nodes (records with struct_type "node" and a path), in order.

    A line that is not JSON is a ValueError."""
    nodes = []
    for line in stdout.splitlines():
        record = json.loads(line)
        if isinstance(record, dict) and record.get("struct_type") == "node" and "path" in record:
            nodes.append(record)
    return nodes
