"""write_atomic / create_exclusive: a planted symlink is never followed, the final file has the mode
asked for, and the writers of kvm-borg's state files go through them."""

import os
import stat

import pytest

from kvm_borg import atomic, metadata, metrics, run_state
from kvm_borg.pipeline import exposure


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


def _predictable_temp(path):
    return next(atomic.temp_names(path))


def test_a_symlink_planted_at_the_predictable_temp_name_is_not_followed(tmp_path, victim):
    target = tmp_path / "state.json"
    _predictable_temp(target).symlink_to(victim)
    atomic.write_atomic(target, b"new\n", 0o600)
    assert victim.read_text() == "precious\n"
    assert target.read_bytes() == b"new\n" and not target.is_symlink()
    assert os.path.islink(_predictable_temp(target))  # left alone, not opened


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path, victim):
    target = tmp_path / "state.json"
    target.symlink_to(victim)
    atomic.write_atomic(target, b"new\n")
    assert victim.read_text() == "precious\n" and target.read_bytes() == b"new\n" and not target.is_symlink()


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_the_final_file_has_the_mode_whatever_the_umask(tmp_path, mode):
    old = os.umask(0o077 if mode != 0o600 else 0)
    try:
        path = atomic.write_atomic(tmp_path / "f", b"x", mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)  # ENOSPC cannot be produced on demand here
    with pytest.raises(OSError, match="No space"):
        atomic.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_create_exclusive_refuses_an_existing_name_or_symlink(tmp_path, victim):
    link = tmp_path / "passphrase"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic.create_exclusive(link, b"secret\n")
    assert victim.read_text() == "precious\n"
    path = atomic.create_exclusive(tmp_path / "new", b"secret\n", 0o600)
    assert path.read_bytes() == b"secret\n" and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_state_writers_do_not_follow_planted_temp_symlinks(tmp_path, victim):
    """run state, metrics, staging and freeze records: each keeps the victim intact."""
    state = tmp_path / "state"
    state.mkdir()
    _predictable_temp(run_state.state_path(state)).symlink_to(victim)
    run_state.update(state, lambda s: s)
    prom = tmp_path / "kvm_borg.prom"
    _predictable_temp(prom).symlink_to(victim)
    metrics.write_textfile(prom, "# nothing\n")
    assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644
    staging = tmp_path / "staging"
    metadata.write_staging(staging, {"a": 1}, "<domain/>", None)
    assert stat.S_IMODE(os.stat(staging / metadata.META_NAME).st_mode) == 0o600

    class _Settings:
        state_dir = tmp_path / "s2"

    records = tmp_path / "s2" / "exposures"
    records.mkdir(parents=True)
    _predictable_temp(records / "u.json").symlink_to(victim)
    exposure.write_record(_Settings, {"uuid": "u"})
    assert victim.read_text() == "precious\n"
    assert run_state.state_path(state).is_file() and (records / "u.json").is_file()


def test_durable_writes_fsync_the_file_and_its_directory_and_staging_writes_neither(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    target = tmp_path / "state.json"
    atomic.write_atomic(target, b"1", 0o640)
    assert len(synced) == 2 and synced[1] == str(tmp_path) and target.read_bytes() == b"1"
    synced.clear()
    atomic.write_atomic(target, b"2", 0o600, durable=False)  # still atomic: the temp file renamed over it
    assert synced == [] and target.read_bytes() == b"2" and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    metadata.write_staging(tmp_path / "staging", {"a": 1}, "<domain/>", "<domain id='1'/>", {"nvram/x.fd": b"v"})
    assert synced == []
    assert (tmp_path / "staging" / metadata.LIVE_XML_NAME).read_text() == "<domain id='1'/>"
    assert (tmp_path / "staging" / "nvram" / "x.fd").read_bytes() == b"v"
