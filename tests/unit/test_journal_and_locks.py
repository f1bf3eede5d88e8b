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
