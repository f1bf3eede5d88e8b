"""store_timeout in the config, and commit_timeout bounding the whole merge back, retries included.

The merge test uses a stand-in for the libvirt connection: a libvirtd that keeps failing for longer
than commit_timeout is a branch the real stack on this host cannot reach without stopping libvirtd."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from kvm_borg import config, journal
from kvm_borg.engine import libvirt_snapshot
from kvm_borg.errors import CommitError, ConfigError, KvmBorgError


def test_store_timeout_defaults_to_12h_and_takes_a_duration():
    assert config.validate({})["store_timeout"] == 12 * 3600
    assert config.validate({"store_timeout": "5s"})["store_timeout"] == 5
    with pytest.raises(ConfigError, match="store_timeout"):
        config.validate({"store_timeout": "soon"})


def test_store_timeout_reaches_the_settings(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("store_timeout: 90m\n")
    assert config.load_config(str(path))[0].store_timeout == 5400


class FailingConnection:
    """A connection whose every lookup fails the way a libvirtd that keeps restarting does (retried)."""

    def __init__(self):
        self.attempts = 0

    def reconnect_if_dead(self) -> bool:
        return False

    def lookup_uuid(self, _uuid):
        self.attempts += 1
        raise KvmBorgError("cannot reach libvirtd")


def test_commit_timeout_bounds_the_whole_merge_and_keeps_the_journal_entry(tmp_path):
    settings = config.load_config(str(_config(tmp_path, commit_timeout="1s", commit_retries=50)))[0]
    entry = journal.Entry(domain="web", uuid=str(uuid.uuid4()), disks=[journal.JournalDisk(
        "vda", "/img/web.qcow2", "file", "qcow2", "/img/web.qcow2.kvm-borg-x")])
    journal.write_entry(settings.journal_dir, entry)
    connection = FailingConnection()
    with pytest.raises(CommitError) as info:
        libvirt_snapshot.bring_back_to_base(entry, connection, settings)
    # Backoff waits 1 s, 2 s, 4 s ...: within 1 s of commit_timeout only a few of the 50 attempts fit.
    assert 1 <= connection.attempts < 5
    message = str(info.value)
    assert "within commit_timeout 1s" in message
    assert "run `kvm-borg recover 'web'`" in message
    assert [e.uuid for e in journal.list_entries(settings.journal_dir)] == [entry.uuid]


def test_a_merge_that_fails_fast_does_not_blame_commit_timeout(tmp_path):
    settings = config.load_config(str(_config(tmp_path, commit_timeout="1h", commit_retries=1)))[0]
    entry = journal.Entry(domain="web", uuid=str(uuid.uuid4()), disks=[])
    connection = FailingConnection()
    with pytest.raises(CommitError) as info:
        libvirt_snapshot.bring_back_to_base(entry, connection, settings)
    assert connection.attempts == 1
    assert "commit_timeout" not in str(info.value) and "kvm-borg recover 'web'" in str(info.value)


def _config(directory: Path, **keys) -> Path:
    path = directory / "config.yaml"
    lines = [f"state_dir: {directory / 'state'}"] + [f"{key}: {value}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
