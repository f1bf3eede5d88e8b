"""The segment view's spec (JSON form, validation, inline arrays), its inode index and the NBD
extent merging: pure parts, no FUSE mount, no NBD server."""

from __future__ import annotations

import json
from array import array

import pytest

from kvm_borg.errors import UsageError
from kvm_borg.nbd_client import merge_extents
from kvm_borg.segment_view import spec as S
from kvm_borg.segments import segment_inode

MiB = 1 << 20


def nbd_disk(target="vda", *, size=16 * MiB, segment=4 * MiB, stamps=None, zero=None, **kw) -> S.NbdDisk:
    count = -(-size // segment)
    return S.NbdDisk(target=target, socket="/run/x/nbd.sock", export=target, virtual_size=size, segment_size=segment,
                     chain=0xDEADBEEF, disk_index=kw.pop("disk_index", 0),
                     stamps=array("Q", stamps if stamps is not None else [5] * count),
                     zero=bytes(zero if zero is not None else [0] * count), manifest={"target": target}, **kw)


def nbd_spec(*disks, now_ns=10) -> S.ViewSpec:
    return S.ViewSpec(kind="nbd", mountpoint="/run/kvm-borg/view", disks=disks or (nbd_disk(),), now_ns=now_ns)


def round_trip(spec: S.ViewSpec) -> S.ViewSpec:
    return S.parse(json.loads(json.dumps(S.to_json(spec))))


def test_an_nbd_spec_survives_its_json_form():
    disk = nbd_disk(size=10 * MiB + 5, segment=4 * MiB, stamps=[1, 7, 2**63], zero=[0, 1, 0])
    spec = S.ViewSpec(kind="nbd", mountpoint="/m", disks=(disk,), now_ns=2**63, run_stamp=7, allow_other=True,
                      owner=(107, 115))
    back = round_trip(spec)
    assert back.disks[0].stamps == array("Q", [1, 7, 2**63])
    assert back.disks[0].zero == bytes([0, 1, 0])
    assert back == spec


def test_a_files_spec_survives_its_json_form():
    spec = S.ViewSpec(kind="files", mountpoint="/m", disks=(S.FilesDisk("vda", "/mnt/a/vda", 9 * MiB, MiB),),
                      workers=3)
    assert round_trip(spec) == spec


def test_a_large_disk_with_one_stamp_packs_small():
    count = 500_000
    text = S.pack_stamps(array("Q", [1_764_000_000_000_000_000] * count))
    assert len(text) < 20_000
    assert S.unpack_stamps(text, count)[count - 1] == 1_764_000_000_000_000_000


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(kind="tar"), "'kind' must be one of"),
    (lambda d: d.update(mountpoint="relative/dir"), "'mountpoint' is out of range"),
    (lambda d: d.pop("disks"), "'disks' is missing"),
    (lambda d: d.update(disks=[]), "'disks' is out of range"),
    (lambda d: d.update(kvm_borg_view=2), "'kvm_borg_view' must be 1"),
    (lambda d: d.update(owner=[0]), "'owner' must be [uid, gid]"),
    (lambda d: d.update(run_stamp=11), "'run_stamp' must be null or an int in [0, now_ns]"),
    (lambda d: d.update(run_stamp="5"), "'run_stamp' must be null or an int in [0, now_ns]"),
    (lambda d: d["disks"][0].update(target="../vda"), "'target' is not a plain name"),
    (lambda d: d["disks"][0].update(virtual_size=0), "'virtual_size' is out of range"),
    (lambda d: d["disks"][0].update(segment_size=True), "'segment_size' must be int"),
    (lambda d: d["disks"][0].update(count=5), "'count' 5 does not match"),
    (lambda d: d["disks"][0].update(stamps=S.pack_stamps(array("Q", [1, 2]))), "'stamps' holds 2 stamps"),
    (lambda d: d["disks"][0].update(stamps="%%%"), "'stamps' is not base64 of zlib data"),
    (lambda d: d["disks"][0].update(zero=S.pack_zero(bytes([0, 2, 0, 0]))), "'zero' flags must be 0 or 1"),
    (lambda d: d["disks"][0].update(connections=0), "'connections' is out of range"),
    (lambda d: d["disks"][0].update(socket="nbd.sock"), "'socket' is out of range"),
    (lambda d: d.update(now_ns=4), "a stamp is newer than 'now_ns'"),
    (lambda d: d["disks"].append(dict(d["disks"][0])), "two disks have the same target"),
])
def test_a_malformed_spec_is_refused_naming_the_key(change, message):
    data = S.to_json(nbd_spec())
    change(data)
    with pytest.raises(S.SpecError) as raised:
        S.parse(json.loads(json.dumps(data)))
    assert message in str(raised.value)
    assert isinstance(raised.value, UsageError)


def test_status_and_stats_files_sit_beside_the_spec(tmp_path):
    spec_path = tmp_path / "view.json"
    assert S.status_path(spec_path) == tmp_path / "view.json.status"
    assert S.stats_path(spec_path) == tmp_path / "stats.json"


def test_the_inode_index_finds_every_segment_of_every_disk():
    from kvm_borg.segment_view.fs import InodeIndex

    per_disk = [array("Q", (segment_inode(77, d, i) for i in range(count))) for d, count in enumerate((5, 1, 300))]
    index = InodeIndex(per_disk)
    for d, inodes in enumerate(per_disk):
        for i, ino in enumerate(inodes):
            assert index.find(ino) == (d, i)
    everything = [ino for inodes in per_disk for ino in inodes]
    assert index.find(1) is None
    assert index.find(max(everything) + 1) is None
    assert index.find(min(everything) - 1) is None


def test_the_inode_index_refuses_two_segments_with_one_inode():
    from kvm_borg.segment_view.fs import InodeIndex

    with pytest.raises(ValueError, match="share inode 9"):
        InodeIndex([array("Q", [3, 9]), array("Q", [9])])


def test_touching_extents_with_equal_flags_are_merged():
    assert merge_extents([(0, 4, 1), (4, 4, 1), (8, 2, 0), (10, 6, 1), (20, 1, 1)]) == \
        [(0, 8, 1), (8, 2, 0), (10, 6, 1), (20, 1, 1)]
