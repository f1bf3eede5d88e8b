"""Credentials in repository URLs never reach a log line, a repr, an error or --json output.

A restic `rest:https://user:secret@host/` URL (or any `scheme://user:password@host`) keeps its
user and host, the password becomes `***`. Pure functions; kvm-borg applies `redact_text` to every
log record (cli), every error line and every --json document, and backends use `redact_url` in
their reprs and messages. The child process still gets the real URL (in its environment).
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://user:password@ ; the password may hold anything but the characters that end userinfo.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:\"']*):(?P<password>[^\s/\"']+)@")


def redact_url(url: str) -> str:
    """Given a repository location, return it with any password in its userinfo replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", url)


def redact_text(text: str) -> str:
    """Given free text (a log line, an error, a JSON document), return it with every URL's password
    replaced by ***."""
    return redact_url(text) if "@" in text else text


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URL passwords in the formatted message of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


class RedactingStream:
    """A text stream wrapper whose write() redacts URL passwords; everything else (buffer, flush,
    isatty, fileno...) is the wrapped stream's. The CLI wraps sys.stdout with it, so no command's
    human or --json output can show a repository password, whatever message it carries."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
