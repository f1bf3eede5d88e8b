"""The bitmap engine's pure decisions: why a disk is read in full, and how a shut-off domain's disk is read."""

from array import array

import pytest

from kvm_borg import segment_state, segments
from kvm_borg.engine import libvirt_bitmap as lb

MiB = 1 << 20
IMAGE = {"path": "/img/a.qcow2", "dev": 1, "ino": 2}


def disk(virtual_size=8 * MiB, segment_size=MiB, layers=None, image=IMAGE):
    count = segments.segment_count(virtual_size, segment_size)
    return segments.DiskSegments("vda", virtual_size, segment_size, count, 7, array("Q", [5]) * count, bytearray(count),
                                 "qcow2", image, layers)


def reason(**changes):
    state = segment_state.BitmapState("kvm-borg.20261201T000000Z.0123abcd", {"vda": disk()}, "u")
    known = dict(no_bitmap=None, full_requested=False, state=state, checkpoint_problem=None, checkpoint_disks={"vda"},
                 previous=state.disks["vda"], target="vda", virtual_size=8 * MiB, segment_size=MiB, format="qcow2",
                 image=IMAGE)
    known.update(changes)
    return lb.full_read_reason(**known)


def test_an_unchanged_disk_with_a_valid_checkpoint_is_read_from_the_bitmap():
    assert reason() is None


@pytest.mark.parametrize("changes, expected", [
    (dict(no_bitmap="raw disk: no bitmap"), "raw disk: no bitmap"),
    (dict(full_requested=True), "--full requested"),
    (dict(state=None, previous=None), "no earlier bitmap backup"),
    (dict(state=segment_state.BitmapState(None, {}, "u"), previous=None), "no earlier bitmap backup"),
    (dict(previous=None), "no earlier bitmap backup of this disk"),
    (dict(checkpoint_problem="checkpoint kvm-borg.x missing"), "checkpoint kvm-borg.x missing"),
    (dict(checkpoint_disks=set()), "checkpoint kvm-borg.20261201T000000Z.0123abcd has no bitmap of this disk"),
])
def test_each_reason_for_a_full_read_is_named(changes, expected):
    assert reason(**changes) == expected


def test_geometry_and_identity_changes_force_a_full_read():
    assert "virtual size changed" in reason(virtual_size=16 * MiB)
    assert "segment size changed" in reason(segment_size=2 * MiB)
    assert "image replaced" in reason(image={**IMAGE, "ino": 3})


def test_only_qcow2_v3_carries_a_bitmap():
    assert lb.no_bitmap_reason("qcow2", "1.1") is None
    assert lb.no_bitmap_reason("raw", None) == "raw disk: no bitmap"
    assert "needs qcow2 v3" in lb.no_bitmap_reason("qcow2", "0.10")


def mode(**changes):
    state = segment_state.BitmapState("kvm-borg.c", {"vda": disk(layers=[[1, 2, 3, 4]])}, "u")
    known = dict(full_requested=False, state=state, previous=state.disks["vda"], geometry_reason=None,
                 layers=[[1, 2, 3, 4]], bitmap_problem=None)
    known.update(changes)
    return lb.offline_disk_mode(**known)


def test_an_offline_disk_whose_layers_did_not_change_is_clean():
    assert mode() == ("clean", None)


def test_an_offline_disk_that_changed_is_read_from_its_bitmap_or_in_full():
    assert mode(layers=[[1, 2, 3, 5]]) == ("bitmap", None)
    assert mode(layers=None) == ("bitmap", None)  # a block device: its ctime says nothing
    assert mode(layers=[[1, 2, 3, 5]], bitmap_problem="the image has no bitmap of checkpoint kvm-borg.c") == \
        ("full", "the image has no bitmap of checkpoint kvm-borg.c")
    no_checkpoint = segment_state.BitmapState(None, {"vda": disk(layers=[[1, 2, 3, 4]])}, "u")
    assert mode(state=no_checkpoint, previous=no_checkpoint.disks["vda"], layers=[[9]])[0] == "full"
    assert mode(full_requested=True) == ("full", "--full requested")
    assert mode(geometry_reason="virtual size changed from 1 to 2") == ("full", "virtual size changed from 1 to 2")
    assert mode(state=None, previous=None) == ("full", "no earlier bitmap backup")


def test_an_offline_bitmap_must_exist_and_be_closed_cleanly():
    info = {"format-specific": {"data": {"bitmaps": [{"name": "kvm-borg.a", "flags": ["auto"]},
                                                     {"name": "kvm-borg.b", "flags": ["in-use", "auto"]}]}}}
    assert lb.offline_bitmap_problem(info, "kvm-borg.a") is None
    assert "not closed cleanly" in lb.offline_bitmap_problem(info, "kvm-borg.b")
    assert lb.offline_bitmap_problem(info, "kvm-borg.c") == "the image has no bitmap of checkpoint kvm-borg.c"
    assert lb.offline_bitmap_problem({}, "kvm-borg.a") == "the image has no bitmap of checkpoint kvm-borg.a"
