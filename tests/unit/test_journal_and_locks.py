"""The journal survives as files; locks exclude a second holder and vanish with the process."""

import multiprocessing
import os

import pytest

from kvm_borg import journal
from kvm_borg.errors import LockedError
from kvm_borg.locks import domain_lock


def _entry():
    return journal.Entry(domain="web 01", uuid="u-1", disks=[
        journal.JournalDisk("vda", "/img/a.qcow2", "file", "qcow2", "/img/a.qcow2.kvm-borg-x.qcow2")])


def test_entry_round_trip_and_removal(tmp_path):
    path = journal.write_entry(tmp_path, _entry())
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    entry = journal.read_entry(tmp_path, "u-1")
    assert entry.domain == "web 01" and entry.disks[0].overlay.endswith(".qcow2")
    entry.disks[0].committed = True
    entry.stage = "committing"
    journal.write_entry(tmp_path, entry)
    assert journal.list_entries(tmp_path)[0].disks[0].committed
    journal.remove_entry(tmp_path, "u-1")
    journal.remove_entry(tmp_path, "u-1")  # idempotent
    assert journal.read_entry(tmp_path, "u-1") is None and journal.list_entries(tmp_path) == []


def _hold(lock_dir, started, release):
    with domain_lock(lock_dir, "u-1", "web"):
        started.set()
        release.wait(10)


def test_second_holder_is_refused_with_the_pid_and_lock_dies_with_process(tmp_path):
    started, release = multiprocessing.Event(), multiprocessing.Event()
    proc = multiprocessing.Process(target=_hold, args=(tmp_path, started, release))
    proc.start()
    assert started.wait(10)
    with pytest.raises(LockedError, match=f"pid {proc.pid}"):
        with domain_lock(tmp_path, "u-1", "web"):
            pass
    proc.kill()
    proc.join()
    with domain_lock(tmp_path, "u-1", "web"):
        pass


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b'{"domain": "x"}',
                                     b'{"domain": "x", "uuid": "u-bad", "disks": [{"target": 1}]}'])
def test_a_corrupt_entry_is_reported_by_file_and_the_good_ones_are_still_listed(tmp_path, content):
    journal.write_entry(tmp_path, _entry())
    bad = tmp_path / "u-bad.json"
    bad.write_bytes(content)
    entries, corrupt = journal.scan_entries(tmp_path)
    assert [e.uuid for e in entries] == ["u-1"]
    assert len(corrupt) == 1 and str(bad) in str(corrupt[0]) and "\n" not in str(corrupt[0])
    assert [e.uuid for e in journal.list_entries(tmp_path)] == ["u-1"]
    with pytest.raises(journal.CorruptEntryError, match="u-bad.json"):
        journal.read_entry(tmp_path, "u-bad")


def test_an_entry_whose_uuid_differs_from_its_file_name_is_corrupt(tmp_path):
    path = journal.write_entry(tmp_path, _entry())
    os.rename(path, tmp_path / "u-2.json")
    entries, corrupt = journal.scan_entries(tmp_path)
    assert entries == [] and "another domain UUID" in str(corrupt[0])


def test_a_failed_write_keeps_the_previous_entry_and_leaves_no_temp_file(tmp_path, monkeypatch):
    journal.write_entry(tmp_path, _entry())
    changed = _entry()
    changed.stage = "committing"

    def full(*_args, **_kwargs):  # ENOSPC cannot be produced in a unit test's tmp_path
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal.os, "fsync", full)
    with pytest.raises(OSError):
        journal.write_entry(tmp_path, changed)
    monkeypatch.undo()
    assert journal.read_entry(tmp_path, "u-1").stage == "planned"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u-1.json"]
