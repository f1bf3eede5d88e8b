"""The journal survives as files; locks exclude a second holder and vanish with the process."""

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from kvm_borg import atomic, config, journal
from kvm_borg.errors import KvmBorgError, LockedError
from kvm_borg.locks import LOCK_DIR, canonical_uuid, domain_lock, lock_name


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


def test_source_specific_fields_round_trip_in_extra(tmp_path):
    entry = journal.Entry(domain="web", uuid="u-2", disks=[], source="libvirt-bitmap",
                          extra={"checkpoint": "kvm-borg.20261201T000000Z.0123abcd", "scratch_dir": "/s/u-2"})
    journal.write_entry(tmp_path, entry)
    assert journal.read_entry(tmp_path, "u-2").extra == entry.extra


def test_an_entry_written_before_extra_existed_reads_with_empty_extra(tmp_path):
    (tmp_path / "u-3.json").write_text('{"domain": "web", "uuid": "u-3", "disks": [], "source": "libvirt-snapshot", '
                                       '"stage": "snapshot", "owner": null, "pid": 1, "created": 1.0, "version": 1}')
    assert journal.read_entry(tmp_path, "u-3").extra == {}
    (tmp_path / "u-4.json").write_text('{"domain": "web", "uuid": "u-4", "disks": [], "extra": [1]}')
    with pytest.raises(journal.CorruptEntryError):
        journal.read_entry(tmp_path, "u-4")


UUID = "6a0f4b8e-54d6-4c3e-9a55-0c2d1f7f3b11"


def _hold(lock_dir, started, release):
    with domain_lock(lock_dir, UUID, "web"):
        started.set()
        release.wait(10)


def test_second_holder_is_refused_with_the_pid_and_lock_dies_with_process(tmp_path):
    lock_dir = tmp_path / "run" / "locks"
    started, release = multiprocessing.Event(), multiprocessing.Event()
    proc = multiprocessing.Process(target=_hold, args=(lock_dir, started, release))
    proc.start()
    assert started.wait(10)
    with pytest.raises(LockedError, match=f"pid {proc.pid}"):
        with domain_lock(lock_dir, UUID, "web"):
            pass
    proc.kill()
    proc.join()
    with domain_lock(lock_dir, UUID, "web"):
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

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError):
        journal.write_entry(tmp_path, changed)
    monkeypatch.undo()
    assert journal.read_entry(tmp_path, "u-1").stage == "planned"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u-1.json"]


def test_lock_dir_and_its_parent_are_private_and_the_lock_is_keyed_by_uuid(tmp_path):
    lock_dir = tmp_path / "run" / "locks"
    (tmp_path / "run").mkdir(mode=0o755)
    with domain_lock(lock_dir, UUID.upper(), "web") as path:
        assert path == lock_dir / f"{UUID}.lock"  # canonical lower-case form
    for directory in (lock_dir, lock_dir.parent):
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700


def test_lock_dir_is_host_wide_whatever_the_state_dir():
    first = config.Settings(**_settings("/srv/kb-a"))
    second = config.Settings(**_settings("/srv/kb-b"))
    assert first.lock_dir == second.lock_dir == LOCK_DIR == Path("/run/kvm-borg/locks")


def test_symlinked_lock_dir_is_refused_and_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "locks").symlink_to(elsewhere)
    with pytest.raises(KvmBorgError, match="is not a directory"):
        with domain_lock(tmp_path / "run" / "locks", UUID, "web"):
            pass
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("bad", ["../../etc/cron.d/x", "u-1", "", "6a0f4b8e/54d6"])
def test_a_lock_name_is_only_ever_a_uuid(bad):
    with pytest.raises(KvmBorgError, match="is not a UUID"):
        lock_name(bad)


SPELLINGS = ["6A0F4B8E-54D6-4F5B-9C3E-2D1A0B9C8D7E", "{6a0f4b8e54d64f5b9c3e2d1a0b9c8d7e}", "urn:uuid:6a0f4b8e-54d6-4f5b-9c3e-"
             "2d1a0b9c8d7e", "6a0f4b8e-54d6-4f5b-9c3e-2d1a0b9c8d7", "../../etc/cron.d/x", "", "g" * 32, "0x" + "a" * 30,
             " " + "a" * 31, "_".join("abcd" * 2 for _ in range(4)), None, 7]


@pytest.mark.parametrize("text", SPELLINGS)
def test_a_lock_names_uuid_is_what_uuid_uuid_makes_of_it_or_refused_alike(text):
    import uuid

    try:
        expected = str(uuid.UUID(text))
    except (ValueError, TypeError, AttributeError) as exc:
        with pytest.raises(type(exc)):
            canonical_uuid(text)
        return
    assert canonical_uuid(text) == expected and lock_name(text) == expected + ".lock"


def _settings(state_dir):
    return dict(libvirt_uri="qemu:///system", state_dir=Path(state_dir), overlay_dir=None, overlay_min_free=0,
                quiesce="auto", guest_agent_timeout=1.0, commit_timeout=1.0, commit_retries=1, domains={},
                plugins=[], borg_binary=None, restic_binary=None, hostname="h", repositories=[])


def test_entry_writer_does_not_follow_a_planted_temp_symlink(tmp_path):
    from kvm_borg.atomic import temp_names

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir(mode=0o700)
    next(temp_names(journal.entry_path(journal_dir, "u-1"))).symlink_to(victim)
    journal.write_entry(journal_dir, _entry())
    assert victim.read_text() == "precious\n" and journal.read_entry(journal_dir, "u-1").domain == "web 01"
