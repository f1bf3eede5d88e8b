"""Segment math: geometry, names, which segments are dirty or zero, inodes, and the plan that gives
every changed segment the run's stamp."""

from array import array

import pytest

from kvm_borg import segments
from kvm_borg.segments import (
    SEGMENT_INODE_BASE, DiskSegments, dirty_segments, full_read_reason, manifest, parse_segment_name, plan_disk,
    run_stamp, segment_count, segment_inode, segment_length, segment_name, zero_segments,
)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
T0 = 1_764_000_000_000_000_000  # a freeze instant in ns


def test_count_and_lengths_with_a_last_partial_segment():
    size = 256 * KiB
    virtual = 10 * MiB + 100 * KiB  # 40 whole segments and 100 KiB
    assert segment_count(virtual, size) == 41
    assert segment_length(0, virtual, size) == size
    assert segment_length(39, virtual, size) == size
    assert segment_length(40, virtual, size) == 100 * KiB
    assert sum(segment_length(i, virtual, size) for i in range(41)) == virtual
    with pytest.raises(ValueError):
        segment_length(41, virtual, size)


def test_count_of_exact_multiples_and_empty_disks():
    assert segment_count(64 * MiB, 4 * MiB) == 16
    assert segment_length(15, 64 * MiB, 4 * MiB) == 4 * MiB
    assert segment_count(0, 4 * MiB) == 0
    assert segment_count(1, 4 * MiB) == 1 and segment_length(0, 1, 4 * MiB) == 1
    assert segment_count(2 * TiB, 4 * MiB) == 524288
    with pytest.raises(ValueError):
        segment_count(10, 0)


def test_names_are_eight_digits_and_more_only_past_10_to_the_8():
    assert segment_name(0, 16) == "00000000"
    assert segment_name(42, 100) == "00000042"
    assert segment_name(99_999_999, 10**8) == "99999999"
    assert segment_name(5, 10**8 + 1) == "000000005"
    assert segment_name(10**8, 10**8 + 1) == "100000000"
    with pytest.raises(ValueError):
        segment_name(16, 16)


@pytest.mark.parametrize("name, count, index", [
    ("00000000", 16, 0), ("00000015", 16, 15), ("00000016", 16, None), ("0000015", 16, None),
    ("000000015", 16, None), ("+0000015", 16, None), (" 0000015", 16, None), ("0000001a", 16, None),
    ("0000001\u0661", 16, None),  # an Arabic-Indic digit: isdigit() but not ASCII
    ("manifest.json", 16, None), ("", 16, None), ("000000005", 10**8 + 1, 5), ("00000005", 10**8 + 1, None),
])
def test_parse_segment_name_accepts_only_the_exact_name(name, count, index):
    assert parse_segment_name(name, count) == index


def test_parse_is_the_inverse_of_name():
    for count in (1, 7, 10**8 + 3):
        for index in {0, count // 2, count - 1}:
            assert parse_segment_name(segment_name(index, count), count) == index


def test_dirty_extents_crossing_boundaries_mark_every_segment_they_touch():
    size = 64 * KiB
    extents = [
        (0, 64 * KiB, False),
        (64 * KiB, 1, True),  # one byte at the start of segment 1
        (3 * size - 1, 2, True),  # the last byte of segment 2 and the first of segment 3
        (5 * size + 10, 2 * size, True),  # inside 5, all of 6, into 7
        (9 * size, size, False),
    ]
    assert dirty_segments(extents, size, 16) == {1, 2, 3, 5, 6, 7}


def test_dirty_extents_beyond_the_end_are_ignored_and_clipped():
    size = 256 * KiB
    count = segment_count(1 * MiB + 1, size)  # 5 segments, the last one byte long
    extents = [(4 * size, 10 * MiB, True), (20 * MiB, MiB, True), (MiB, 0, True)]
    assert dirty_segments(extents, size, count) == {4}
    assert dirty_segments([(0, 2 * GiB, True)], size, count) == set(range(5))
    assert dirty_segments([], size, count) == set()


def test_zero_only_when_the_whole_segment_is_zero():
    size = 64 * KiB
    zero, data = 2, 0
    extents = [
        (0, size, zero),  # 0: zero
        (size, size // 2, zero), (size + size // 2, size // 2, zero | 1),  # 1: two zero extents (hole + flag 1)
        (2 * size, size // 2, zero), (2 * size + size // 2, size // 2, data),  # 2: half data
        (3 * size, 3 * size, zero),  # 3, 4, 5 zero in one extent
        (6 * size, 1, data), (6 * size + 1, size - 1, zero),  # 6: one data byte
        (7 * size, size, zero),  # 7: zero
    ]
    assert zero_segments(extents, size, 8, 8 * size) == {0, 1, 3, 4, 5, 7}


def test_zero_needs_the_extents_to_cover_the_segment():
    size = 64 * KiB
    gap = [(0, size // 2, 2), (size // 2 + 512, size, 2)]  # 512 bytes not described
    assert zero_segments(gap, size, 2, 2 * size) == set()
    assert zero_segments([(0, size, 2)], size, 4, 4 * size) == {0}  # the rest not described: not zero


def test_zero_last_partial_segment_and_extents_past_the_end():
    size = 256 * KiB
    virtual = 2 * size + 4096
    assert zero_segments([(0, size, 0), (size, size + 4096, 2)], size, 3, virtual) == {1, 2}
    assert zero_segments([(0, 2 * size, 0), (2 * size, 10 * size, 2)], size, 3, virtual) == {2}
    assert zero_segments([(0, 2 * size + 4095, 2)], size, 3, virtual) == {0, 1}  # one byte short
    assert zero_segments([(0, virtual, 2)], size, 3, virtual) == {0, 1, 2}
    with pytest.raises(ValueError):
        zero_segments([(0, size, 2)], size, 4, virtual)  # count does not match the size


def test_zero_extents_out_of_order_are_refused():
    with pytest.raises(ValueError):
        zero_segments([(65536, 65536, 2), (0, 65536, 2)], 65536, 2, 131072)


def test_inodes_are_unique_across_disks_and_segments_whatever_their_chains():
    chains = (0, 1, 0xFFFFFFFF, 0x12345678, 0x00020000)  # the last shares its low 17 bits with 0
    inodes = [segment_inode(chain, disk, index) for disk, chain in enumerate(chains) for index in range(2048)]
    assert len(set(inodes)) == len(inodes)
    assert all(SEGMENT_INODE_BASE <= ino < 2**62 for ino in inodes)
    assert segment_inode(0xFFFFFFFF, 1023, 2**34 - 1) < 2**62
    assert segment_inode(7, 0, 1) != segment_inode(7, 1, 0)
    for bad in ((2**32, 0, 0), (1, 1024, 0), (1, 0, 2**34), (-1, 0, 0)):
        with pytest.raises(ValueError):
            segment_inode(*bad)


def test_inodes_ascend_with_the_segments_so_borg_reads_a_disk_in_order():
    # borg walks a directory in inode order (borg.helpers.fs.scandir_inorder)
    for chain in (0, 0x1FFFF, 0xDEADBEEF):
        inodes = [segment_inode(chain, 3, index) for index in range(5000)]
        assert inodes == sorted(inodes)
        assert sorted(range(5000), key=lambda i: segment_inode(chain, 3, i)) == list(range(5000))


def test_a_new_chain_gives_every_segment_another_inode():
    previous = 0x12345678
    for _ in range(200):
        chain = segments.new_chain(previous)
        assert chain != previous and 0 <= chain < 2**32
        for disk, index in ((0, 0), (3, 524287), (1023, 2**34 - 1)):
            assert segment_inode(chain, disk, index) != segment_inode(previous, disk, index)
    assert len({segments.new_chain() for _ in range(100)}) > 95  # random


def _first(stamp=T0, *, zero=frozenset(), chain=None, virtual=1 * MiB + 4096, size=256 * KiB):
    return plan_disk(None, dirty=None, zero=set(zero), stamp=stamp, target="vda", virtual_size=virtual,
                     segment_size=size, image={"path": "/i/a.qcow2", "dev": 1, "ino": 2}, chain=chain)


def test_a_first_run_is_a_full_read_every_segment_stamped():
    disk = _first(zero={1, 4})
    assert disk.count == 5 and list(disk.stamps) == [T0] * 5
    assert list(disk.zero) == [0, 1, 0, 0, 1]
    assert [disk.file_size(i) for i in range(5)] == [256 * KiB, 0, 256 * KiB, 256 * KiB, 0]
    assert disk.length(4) == 4096 and 0 <= disk.chain < 2**32


def test_an_incremental_plan_stamps_only_dirty_segments_and_keeps_the_chain():
    first = _first(zero={1, 4}, chain=77)
    second = plan_disk(first, dirty={1, 2}, zero={2, 4}, stamp=T0 + 5, target="vda", virtual_size=first.virtual_size,
                       segment_size=first.segment_size)
    assert list(second.stamps) == [T0, T0 + 5, T0 + 5, T0, T0]
    assert list(second.zero) == [0, 0, 1, 0, 1]  # 1 was written (no longer zero), 2 trimmed, 4 clean: kept
    assert second.chain == 77
    assert list(first.stamps) == [T0] * 5 and list(first.zero) == [0, 1, 0, 0, 1]  # the previous state untouched
    unchanged = plan_disk(second, dirty=set(), zero=set(), stamp=T0 + 6, target="vda",
                          virtual_size=first.virtual_size, segment_size=first.segment_size)
    assert unchanged.stamps == second.stamps and unchanged.zero == second.zero


def test_a_full_read_starts_a_new_chain_and_restamps_everything():
    first = _first(chain=5)
    again = plan_disk(first, dirty=None, zero=set(), stamp=T0 + 1, target="vda", virtual_size=first.virtual_size,
                      segment_size=first.segment_size)
    assert again.chain != 5 and list(again.stamps) == [T0 + 1] * 5
    chains = {plan_disk(first, dirty=None, zero=set(), stamp=T0 + 1, target="vda", virtual_size=first.virtual_size,
                        segment_size=first.segment_size).chain for _ in range(50)}
    assert 5 not in chains and len(chains) > 40  # random


def test_stamps_must_strictly_increase():
    first = _first()
    for stamp in (T0, T0 - 1):
        with pytest.raises(ValueError, match="not newer"):
            plan_disk(first, dirty={0}, zero=set(), stamp=stamp, target="vda", virtual_size=first.virtual_size,
                      segment_size=first.segment_size)
    assert run_stamp(T0 - 10, [first]) == T0 + 1  # a clock that went back still gives a newer stamp
    assert run_stamp(T0 + 99, [first]) == T0 + 99
    assert run_stamp(T0, []) == T0


def test_an_incremental_plan_needs_the_same_geometry():
    first = _first()
    with pytest.raises(ValueError, match="virtual size changed"):
        plan_disk(first, dirty={0}, zero=set(), stamp=T0 + 1, target="vda", virtual_size=2 * MiB,
                  segment_size=first.segment_size)
    with pytest.raises(ValueError, match="no previous state"):
        plan_disk(None, dirty={0}, zero=set(), stamp=T0, target="vda", virtual_size=MiB, segment_size=64 * KiB)
    with pytest.raises(ValueError, match="outside"):
        plan_disk(first, dirty={5}, zero=set(), stamp=T0 + 1, target="vda", virtual_size=first.virtual_size,
                  segment_size=first.segment_size)


def test_full_read_reasons():
    first = _first()
    same = dict(virtual_size=first.virtual_size, segment_size=first.segment_size, format="qcow2")
    assert full_read_reason(first, **same) is None
    assert full_read_reason(first, **same, image={"path": "/i/a.qcow2", "dev": 1, "ino": 2}) is None
    assert full_read_reason(None, **same) == "no previous state for this disk"
    assert "virtual size changed" in full_read_reason(first, **{**same, "virtual_size": 2 * MiB})
    assert "segment size changed" in full_read_reason(first, **{**same, "segment_size": 64 * KiB})
    assert "format changed" in full_read_reason(first, **{**same, "format": "raw"})
    assert "image replaced" in full_read_reason(first, **same, image={"path": "/i/a.qcow2", "dev": 1, "ino": 3})


def test_disk_segments_refuse_inconsistent_arrays():
    with pytest.raises(ValueError):
        DiskSegments("vda", MiB, 256 * KiB, 5, 1, array("Q", [1] * 4), bytearray(4))
    with pytest.raises(ValueError):
        DiskSegments("vda", MiB, 256 * KiB, 4, 1, array("Q", [1] * 3), bytearray(4))
    with pytest.raises(ValueError):
        DiskSegments("vda", MiB, 256 * KiB, 4, 2**32, array("Q", [1] * 4), bytearray(4))


def test_manifest_describes_the_layout():
    disk = _first()
    assert manifest(disk) == {"kvm_borg_segments": 1, "target": "vda", "virtual_size": MiB + 4096,
                              "segment_size": 256 * KiB, "segment_count": 5, "format": "qcow2"}


def test_a_2_tib_disk_plans_quickly():
    import time

    count = segment_count(2 * TiB, 4 * MiB)
    started = time.perf_counter()
    first = plan_disk(None, dirty=None, zero=set(range(0, count, 2)), stamp=T0, target="vda",
                      virtual_size=2 * TiB, segment_size=4 * MiB)
    second = plan_disk(first, dirty=set(range(0, count, 100)), zero=set(), stamp=T0 + 1, target="vda",
                       virtual_size=2 * TiB, segment_size=4 * MiB)
    assert time.perf_counter() - started < 2.0
    assert second.stamps[100] == T0 + 1 and second.stamps[101] == T0 and second.zero[100] == 0
    assert segments.segment_inode(second.chain, 0, count - 1) > SEGMENT_INODE_BASE


def test_dirty_and_zero_agree_with_a_byte_by_byte_reference_on_random_maps():
    import random

    rng = random.Random(15)
    for _ in range(300):
        size = rng.choice((4, 8, 16))
        virtual = rng.randrange(0, 12 * size)
        count = segment_count(virtual, size)
        extents, offset = [], 0
        while offset < virtual + rng.choice((0, 0, size)):  # sometimes past the end
            length = rng.randrange(1, 2 * size)
            if rng.random() < 0.1:
                offset += rng.randrange(1, size)  # a gap: bytes not described
            extents.append((offset, length, rng.choice((0, 1, 2, 3))))
            offset += length
        if rng.random() < 0.2:
            extents = extents[: rng.randrange(0, len(extents) + 1)]  # the map ends early
        flag_at = {}
        for start, length, flags in extents:
            for byte in range(start, start + length):
                flag_at[byte] = flags
        expected_zero = {i for i in range(count)
                         if all(flag_at.get(b, 0) & 2 for b in range(i * size, min((i + 1) * size, virtual)))}
        expected_dirty = {b // size for b, flags in flag_at.items() if flags & 1 and b < count * size}
        assert zero_segments(extents, size, count, virtual) == expected_zero, (size, virtual, extents)
        assert dirty_segments([(o, n, f & 1) for o, n, f in extents], size, count) == expected_dirty
