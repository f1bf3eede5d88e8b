"""redact_url / redact_text: passwords in URLs become ***, everything else is left as it was."""

import io
import logging

import pytest

from kvm_borg.backends.restic.repository import ResticRepository
from kvm_borg.redact import RedactingFilter, RedactingStream, redact_text, redact_url


@pytest.mark.parametrize("url, redacted", [
    ("rest:https://user:secret@host/", "rest:https://user:***@host/"),
    ("rest:http://u:p@ss@127.0.0.1:8000/repo/", "rest:http://u:***@127.0.0.1:8000/repo/"),
    ("ssh://user:pw@host:22/./repo", "ssh://user:***@host:22/./repo"),
    ("s3:https://s3.amazonaws.com/bucket/kb", "s3:https://s3.amazonaws.com/bucket/kb"),
    ("sftp:backup@host:/srv/restic", "sftp:backup@host:/srv/restic"),
    ("ssh://borg@host/./repo", "ssh://borg@host/./repo"),
    ("https://host:8000/path@x", "https://host:8000/path@x"),
    ("/srv/borg/repo", "/srv/borg/repo"),
])
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


def test_redact_text_finds_every_url_in_a_line_and_in_json():
    line = 'open rest:http://a:one@h/ failed, then {"url": "rest:http://b:two@h:1/"}'
    assert redact_text(line) == 'open rest:http://a:***@h/ failed, then {"url": "rest:http://b:***@h:1/"}'


def test_log_records_and_streams_are_redacted():
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("kbtest.redact")
    logger.addHandler(handler)
    try:
        logger.warning("created %s", "rest:http://u:hunter2@h/")
    finally:
        logger.removeHandler(handler)
    stream = RedactingStream(io.StringIO())
    stream.write("rest:http://u:hunter2@h/\n")
    assert "hunter2" not in buffer.getvalue() + stream.getvalue() and "u:***@h" in stream.getvalue()


def test_a_backend_repr_hides_the_password():
    settings = type("S", (), {"hostname": "h", "restic_binary": None, "progress": False})()
    backend = ResticRepository({"name": "r", "type": "restic", "url": "rest:http://u:hunter2@127.0.0.1:1/",
                                "passphrase_file": "/nonexistent"}, settings)
    assert "hunter2" not in repr(backend) and "u:***@127.0.0.1" in repr(backend)
