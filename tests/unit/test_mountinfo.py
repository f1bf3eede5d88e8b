"""kvm_borg.mountinfo: the one /proc/self/mountinfo parser (octal escapes, options, odd names)."""

from __future__ import annotations

import os

import pytest

from harness.mounts import tmpfs
from kvm_borg import mountinfo

SAMPLE = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    b"36 22 7:0 / /mnt/with\\040space\\011tab\\012newline\\134backslash ro,nosuid,nodev,noexec,relatime"
    b" shared:5 master:2 - xfs /dev/loop0 ro,nouuid\n"
    b"37 22 0:45 / /mnt/caf\xc3\xa9 ro,nosuid - fuse borgfs ro,user_id=0,group_id=0,default_permissions\n"
    b"38 22 0:46 / /mnt/latin\xe9 rw - tmpfs tmp\\040fs rw\n"
    b"garbage line without separator\n"
)


@pytest.mark.parametrize("field, expected", [
    (b"/a\\040b", "/a b"),
    (b"/a\\011b", "/a\tb"),
    (b"/a\\012b", "/a\nb"),
    (b"/a\\134b", "/a\\b"),
    (b"/a\\134040b", "/a\\040b"),  # an escaped backslash followed by digits stays a backslash and digits
    (b"/plain", "/plain"),
    (b"/caf\xc3\xa9", "/café"),
    (b"/latin\xe9", os.fsdecode(b"/latin\xe9")),  # not UTF-8: decoded like os.listdir() decodes it
])
def test_unescape_decodes_the_kernels_octal_escapes(field, expected):
    assert mountinfo.unescape(field) == expected


def test_parse_reads_mount_point_type_source_and_both_option_sets():
    entries = mountinfo.parse(SAMPLE)
    assert [e.mount_point for e in entries] == [
        "/", "/mnt/with space\ttab\nnewline\\backslash", "/mnt/café", os.fsdecode(b"/mnt/latin\xe9")]
    special = entries[1]
    assert special.fs_type == "xfs" and special.source == "/dev/loop0"
    assert special.options == {"ro", "nosuid", "nodev", "noexec", "relatime"}
    assert special.super_options == {"ro", "nouuid"}
    assert entries[2].fs_type == "fuse" and "default_permissions" in entries[2].super_options
    assert entries[3].source == "tmp fs"


def test_mount_points_of_a_file_and_entry_at_takes_the_topmost(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_bytes(SAMPLE + b"39 36 7:1 / /mnt/with\\040space\\011tab\\012newline\\134backslash rw - ext4 /dev/loop1 rw\n")
    assert "/mnt/café" in mountinfo.mount_points(str(path))
    top = mountinfo.entry_at("/mnt/with space\ttab\nnewline\\backslash", str(path))
    assert top.source == "/dev/loop1" and top.options == {"rw"}
    assert mountinfo.entry_at("/not/mounted", str(path)) is None


def test_a_real_mount_with_a_space_tab_backslash_and_non_utf8_name_is_found(tmp_path):
    name = os.fsdecode(b"odd \t\\\xe9 dir")
    with tmpfs(tmp_path / name, "1m", "nosuid", "nodev") as point:
        assert str(point) in mountinfo.mount_points()
        entry = mountinfo.entry_at(str(point))
        assert entry.fs_type == "tmpfs" and {"nosuid", "nodev"} <= entry.options
    assert str(point) not in mountinfo.mount_points()
