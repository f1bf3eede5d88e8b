"""The bitmap state file: a round trip keeps every stamp and flag, it is written 0600 and atomically,
a damaged or foreign file counts as absent (with a warning naming it), and a 2 TiB disk stays cheap."""

import base64
import json
import logging
import os
import stat
import time
import zlib
from array import array

import pytest

from kvm_borg import segment_state
from kvm_borg.segment_state import BitmapState, layer_identity, load, save, state_path
from kvm_borg.segments import plan_disk, segment_count

UUID = "6f1c1f0e-3c2b-4d55-9a51-0b8f2a3c4d5e"
T0 = 1_764_000_000_000_000_000
MiB, TiB = 1024**2, 1024**4


def _state(checkpoint="kvm-borg.20261201T120000Z.0a1b2c3d"):
    vda = plan_disk(None, dirty=None, zero={2}, stamp=T0, target="vda", virtual_size=5 * MiB + 512,
                    segment_size=MiB, image={"path": "/img/a.qcow2", "dev": 2049, "ino": 131}, chain=0xDEADBEEF)
    vda = plan_disk(vda, dirty={0, 5}, zero=set(), stamp=T0 + 7, target="vda", virtual_size=vda.virtual_size,
                    segment_size=MiB, image=vda.image)
    vdb = plan_disk(None, dirty=None, zero=set(), stamp=T0, target="vdb", virtual_size=0, segment_size=MiB,
                    format="raw", layers=[[2049, 7, 4096, T0 - 3]], chain=0)
    return BitmapState(checkpoint, {"vda": vda, "vdb": vdb}, UUID)


def test_round_trip_keeps_everything(tmp_path):
    state = _state()
    path = save(tmp_path, state)
    assert path == tmp_path / "bitmap" / f"{UUID}.json"
    loaded = load(tmp_path, UUID)
    assert loaded == state
    assert list(loaded.disks["vda"].stamps) == [T0 + 7, T0, T0, T0, T0, T0 + 7]
    assert list(loaded.disks["vda"].zero) == [0, 0, 1, 0, 0, 0]
    assert loaded.disks["vdb"].count == 0 and loaded.disks["vdb"].layers == [[2049, 7, 4096, T0 - 3]]
    assert load(tmp_path, UUID.upper()) == state


def test_the_file_is_versioned_json_0600_with_compressed_arrays(tmp_path):
    path = save(tmp_path, _state(checkpoint=None))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["version"] == 1 and document["checkpoint"] is None and document["uuid"] == UUID
    raw = zlib.decompress(base64.b64decode(document["disks"]["vda"]["stamps"]))
    assert array("Q", raw).tolist()[:2] == [T0 + 7, T0]  # little-endian uint64 on this host
    assert zlib.decompress(base64.b64decode(document["disks"]["vda"]["zero"])) == b"\0\0\1\0\0\0"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_a_missing_file_is_absent_without_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load(tmp_path, UUID) is None
    assert caplog.records == []


def _damage(document, how):
    disk = document["disks"]["vda"]
    if how == "version 2":
        document["version"] = 2
    elif how == "count does not cover the size":
        disk["count"] = 99
    elif how == "short stamps":
        disk["stamps"] = base64.b64encode(zlib.compress(b"\0" * 8)).decode()
    elif how == "stamps not base64":
        disk["stamps"] = "%%%"
    elif how == "zero flag 2":
        disk["zero"] = base64.b64encode(zlib.compress(b"\0\0\2\0\0\0")).decode()
    elif how == "a bomb instead of the zero flags":
        disk["zero"] = base64.b64encode(zlib.compress(b"\0" * (8 * MiB))).decode()
    elif how == "chain too large":
        disk["chain"] = 2**32
    elif how == "boolean size":
        disk["virtual_size"] = True
    elif how == "target differs":
        disk["target"] = "vdz"
    elif how == "another domain's file":
        document["uuid"] = "00000000-0000-0000-0000-000000000000"
    return document


@pytest.mark.parametrize("how", ["version 2", "count does not cover the size", "short stamps", "stamps not base64",
                                 "zero flag 2", "a bomb instead of the zero flags", "chain too large",
                                 "boolean size", "target differs", "another domain's file"])
def test_a_corrupt_state_is_absent_with_a_warning_naming_the_file(tmp_path, caplog, how):
    path = save(tmp_path, _state())
    path.write_text(json.dumps(_damage(json.loads(path.read_text()), how)))
    with caplog.at_level(logging.WARNING):
        assert load(tmp_path, UUID) is None
    assert len(caplog.records) == 1 and str(path) in caplog.records[0].getMessage()


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", b"null", b'{"version": 1}', b"[" * 100000])
def test_garbage_is_absent_with_a_warning(tmp_path, caplog, content):
    path = state_path(tmp_path, UUID)
    path.parent.mkdir()
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert load(tmp_path, UUID) is None
    assert str(path) in caplog.text


def test_a_symlink_or_directory_in_place_of_the_file_is_not_followed(tmp_path, caplog):
    real = save(tmp_path / "elsewhere", _state())
    path = state_path(tmp_path, UUID)
    path.parent.mkdir()
    path.symlink_to(real)
    assert load(tmp_path, UUID) is None
    path.unlink()
    path.mkdir()
    assert load(tmp_path, UUID) is None
    assert caplog.text.count(str(path)) == 2


def test_save_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep")
    path = state_path(tmp_path, UUID)
    path.parent.mkdir()
    path.symlink_to(target)
    save(tmp_path, _state())
    assert target.read_text() == "keep" and not path.is_symlink() and load(tmp_path, UUID) == _state()


def test_a_bad_uuid_never_names_another_file(tmp_path):
    for uuid in ("../../etc/passwd", "", "6f1c1f0e-3c2b-4d55-9a51-0b8f2a3c4d5e/x"):
        with pytest.raises(ValueError):
            state_path(tmp_path, uuid)
    with pytest.raises(ValueError):
        save(tmp_path, BitmapState(None, {}, ""))


def test_remove(tmp_path):
    save(tmp_path, _state())
    segment_state.remove(tmp_path, UUID)
    assert load(tmp_path, UUID) is None
    segment_state.remove(tmp_path, UUID)  # absent: nothing to do


def test_a_2_tib_disk_of_4_mib_segments_loads_and_saves_fast_and_small(tmp_path):
    size, virtual = 4 * MiB, 2 * TiB
    count = segment_count(virtual, size)
    assert count == 524288
    disk = plan_disk(None, dirty=None, zero=set(range(0, count, 3)), stamp=T0, target="vda",
                     virtual_size=virtual, segment_size=size)
    # as after 40 runs that each changed a different spread of segments: neighbours differ
    disk.stamps = array("Q", (T0 + (index * 7919) % 40 for index in range(count)))
    state = BitmapState("kvm-borg.x", {"vda": disk}, UUID)
    started = time.perf_counter()
    path = save(tmp_path, state)
    saved = time.perf_counter()
    loaded = load(tmp_path, UUID)
    loaded_at = time.perf_counter()
    assert loaded == state
    assert saved - started < 0.5 and loaded_at - saved < 0.5, (saved - started, loaded_at - saved)
    assert os.path.getsize(path) < 4 * MiB


def test_layer_identity_of_files_and_refusal_of_block_devices(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    base.write_bytes(b"b" * 100)
    top.write_bytes(b"t" * 10)
    (tmp_path / "link").symlink_to(top)
    first = layer_identity([str(tmp_path / "link"), str(base)])
    info = os.stat(top)
    assert first[0] == [info.st_dev, info.st_ino, 10, info.st_ctime_ns] and first[1][2] == 100
    assert layer_identity([str(top), str(base)]) == first
    time.sleep(0.01)
    with open(base, "r+b") as handle:
        handle.write(b"x")  # same size, new ctime
    assert layer_identity([str(top), str(base)])[1] != first[1]
    assert layer_identity(["/dev/null"]) is None
    with pytest.raises(OSError):
        layer_identity([str(tmp_path / "missing")])


def test_a_pending_state_is_folded_only_for_its_own_checkpoint(tmp_path):
    old, new = _state("kvm-borg.20261201T110000Z.00000001"), _state("kvm-borg.20261201T120000Z.00000002")
    save(tmp_path, old)
    segment_state.save_pending(tmp_path, new)
    assert stat.S_IMODE(os.stat(segment_state.pending_path(tmp_path, new.uuid)).st_mode) == 0o600
    # a run that ends with another checkpoint in its journal entry: the pending state is not its own
    assert segment_state.fold_pending(tmp_path, new.uuid, "kvm-borg.20261201T130000Z.00000003") is None
    assert not segment_state.pending_path(tmp_path, new.uuid).exists()
    assert load(tmp_path, old.uuid).checkpoint == old.checkpoint
    # its own checkpoint: it becomes the state, in one rename
    segment_state.save_pending(tmp_path, new)
    folded = segment_state.fold_pending(tmp_path, new.uuid, new.checkpoint)
    assert folded.checkpoint == new.checkpoint and load(tmp_path, new.uuid).checkpoint == new.checkpoint
    assert not segment_state.pending_path(tmp_path, new.uuid).exists()
    assert segment_state.fold_pending(tmp_path, new.uuid, new.checkpoint) is None  # nothing pending any more


def test_an_unusable_pending_state_is_dropped_and_the_old_state_kept(tmp_path, caplog):
    old = _state("kvm-borg.20261201T110000Z.00000001")
    save(tmp_path, old)
    pending = segment_state.pending_path(tmp_path, old.uuid)
    pending.write_bytes(b"{not json")
    assert segment_state.fold_pending(tmp_path, old.uuid, "kvm-borg.20261201T120000Z.00000002") is None
    assert not pending.exists() and load(tmp_path, old.uuid).checkpoint == old.checkpoint
    assert str(pending) in caplog.text
