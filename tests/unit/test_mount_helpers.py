"""kvm_borg.actions.mount's pure helpers: mount options, formats, qcow2 headers, MOUNTPOINT checks, blockdevs."""

from __future__ import annotations

import json
import struct

import pytest

from kvm_borg.actions import mount
from kvm_borg.errors import RefusedError, UsageError


@pytest.mark.parametrize("fs_type", sorted(mount.MOUNTABLE))
def test_every_file_system_is_mounted_ro_nosuid_nodev_noexec(fs_type):
    options = mount.mount_options(fs_type).split(",")
    assert options[:4] == ["ro", "nosuid", "nodev", "noexec"]
    assert options[4:] == (["nouuid"] if fs_type == "xfs" else [])
    assert not {"norecovery", "noload"} & set(options)  # the journal replay goes into the throwaway overlay


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_raw_and_qcow2_are_mounted(fmt):
    assert mount.check_mount_format(fmt, "disk vda") == fmt


@pytest.mark.parametrize("fmt, message", [
    ("vmdk", "disk vda is a vmdk image: kvm-borg mount opens only qcow2 and raw images"),
    ("vdi", "is a vdi image"),
    ("vvfat", "invalid image format"),  # not an image format qemu-img writes: refused by archive_meta.check_format
    ("nbd", "invalid image format"),
    ("../etc", "invalid image format"),
    ("QCOW2", "invalid image format"),
    (None, "invalid image format"),
])
def test_other_or_invalid_formats_are_refused(fmt, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        mount.check_mount_format(fmt, "disk vda")


def qcow2_header(version: int = 3, incompatible: int = 0) -> bytes:
    header = b"QFI\xfb" + struct.pack(">I", version) + bytes(64)
    return header + struct.pack(">Q", incompatible) + bytes(32)


def test_qcow2_headers_without_an_external_data_file_may_be_opened():
    assert mount.qcow2_header_problem(qcow2_header(3)) is None
    assert mount.qcow2_header_problem(qcow2_header(3, incompatible=0b11)) is None  # dirty, corrupt: qemu's business
    assert mount.qcow2_header_problem(qcow2_header(2)[:72]) is None


def test_qcow2_headers_asking_for_an_external_data_file_or_not_qcow2_are_refused():
    assert "external data file" in mount.qcow2_header_problem(qcow2_header(3, incompatible=1 << 2))
    assert mount.qcow2_header_problem(b"\0" * 80) == "is not a qcow2 image"
    assert mount.qcow2_header_problem(b"QFI\xfb") == "is not a qcow2 image"
    assert "truncated" in mount.qcow2_header_problem(qcow2_header(3)[:75])


def test_a_missing_mount_point_is_accepted_it_is_created_0700():
    mount.check_mount_point("/mnt/new", uid=0, exists=False)


def test_an_empty_private_directory_of_ours_is_accepted():
    mount.check_mount_point("/mnt/x", uid=0, exists=True, mode=0o40700, owner=0)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"mode": 0o40755}, UsageError, "accessible by other users (mode 0755): chmod 700"),
    ({"mode": 0o40710}, UsageError, "(mode 0710)"),
    ({"mode": 0o41777}, UsageError, "(mode 1777)"),
    ({"owner": 1000}, UsageError, "owned by uid 1000"),
    ({"is_dir": False}, UsageError, "is not a directory"),
    ({"empty": False}, RefusedError, "is not empty"),
])
def test_a_mount_point_that_others_can_reach_or_is_not_ours_is_refused(kwargs, error, message):
    checked = {"uid": 0, "exists": True, "mode": 0o40700, "owner": 0} | kwargs
    with pytest.raises(error) as excinfo:
        mount.check_mount_point("/mnt/x", **checked)
    assert message in str(excinfo.value)


def test_blockdev_options_name_every_layer_and_format_and_no_backing_from_a_header():
    args = [json.loads(a) for a in mount.blockdev_options("/a/top.qcow2", "qcow2", "/w/o.qcow2",
                                                          [("/a/mid.qcow2", "qcow2"), ("/a/base.raw", "raw")])]
    by_node = {a["node-name"]: a for a in args}
    assert by_node["l0"] == {"driver": "qcow2", "node-name": "l0", "file": "f0", "read-only": True, "backing": "l1"}
    assert by_node["l1"]["backing"] == "l2" and by_node["l1"]["driver"] == "qcow2"
    assert by_node["l2"] == {"driver": "raw", "node-name": "l2", "file": "f2", "read-only": True}
    assert all(by_node[f"f{i}"]["read-only"] for i in range(3))
    assert by_node["overlay"]["backing"] == "l0"
    # A node is defined before it is referenced.
    names = [a["node-name"] for a in args]
    assert names.index("l2") < names.index("l1") < names.index("l0") < names.index("overlay")
    last = [json.loads(a) for a in mount.blockdev_options("/a/top.qcow2", "qcow2", "/w/o.qcow2", [])]
    assert {a["node-name"]: a for a in last}["l0"]["backing"] is None
