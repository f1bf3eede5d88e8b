"""The bitmap tests' own arithmetic (tests/harness/bitmap.py), kept apart from the product's on purpose."""

from __future__ import annotations

from harness.bitmap import KiB, MiB, segment_count, segment_files, touched_segments


def test_touched_segments_counts_every_segment_a_write_overlaps():
    size = 256 * KiB
    assert touched_segments(0, 1, size) == {0}
    assert touched_segments(size - 512, 1024, size) == {0, 1}
    assert touched_segments(3 * MiB + 200 * KiB, 128 * KiB, size) == {12, 13}
    assert touched_segments(64 * MiB - 64 * KiB, 64 * KiB, size) == {255}
    assert segment_count(64 * MiB, size) == 256 and segment_count(64 * MiB + 1, size) == 257


def test_segment_files_picks_the_segment_files_of_one_disk_from_archive_paths():
    paths = ["var/lib/kb/view/u/vda/00000012", "/var/lib/kb/view/u/vda/manifest.json",
             "var/lib/kb/view/u/vdb/00000003", "/var/lib/kb/view/u/vda/00000255", "var/lib/kb/staging/u/meta.json"]
    assert segment_files(paths, "vda") == {12, 255}
    assert segment_files(paths, "vdb") == {3}
