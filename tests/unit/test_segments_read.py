"""segments_read: a segmented disk's tar stream checked member by member and written sparse at its offsets.

The streams here are made with tarfile like borg export-tar makes them (GNU format, the directory
member first, full archive paths) or restic dump (no directory member); the real backends are in
tests/test_restore_segments.py."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile

import pytest

from kvm_borg.errors import UsageError
from kvm_borg.pipeline.segments_read import (
    DenseOutput,
    SparseFileOutput,
    manifest_problem,
    member_kind,
    parse_segments,
    read_segments,
)
from kvm_borg.restore_plan import RestoreDisk, RestoreFile

SEG = 64 << 10
DIR = "var/lib/kvm-borg/view/1111/vda"


def disk(virtual_size=3 * SEG + 4096, fmt="raw", size=SEG) -> RestoreDisk:
    count = -(-virtual_size // size)
    return RestoreDisk("vda", fmt, RestoreFile(DIR, "/dst/web-vda.raw"), virtual_size, layout="segments",
                       segment_size=size, segment_count=count)


def manifest(d: RestoreDisk, **changes) -> bytes:
    data = {"kvm_borg_segments": 1, "target": d.target, "virtual_size": d.virtual_size,
            "segment_size": d.segment_size, "segment_count": d.segment_count, "format": d.format}
    data.update(changes)
    return json.dumps(data).encode()


def contents(d: RestoreDisk, zero=(1,)) -> dict[int, bytes]:
    """Segment index -> bytes stored (b"" for a zero segment); the data segments random, with a zero block inside."""
    rng = random.Random(d.virtual_size)
    result = {}
    for i in range(d.segment_count):
        length = min(d.segment_size, d.virtual_size - i * d.segment_size)
        if i in zero:
            result[i] = b""
        else:
            data = bytearray(rng.randbytes(length))
            data[:min(4096, length)] = bytes(min(4096, length))  # a zero block inside a data segment: a hole too
            result[i] = bytes(data)
    return result


def make_tar(members: list[tuple], *, directory=True) -> bytes:
    """Given [(name, bytes | ("symlink", target) | ("dir",))], return a GNU tar stream."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        if directory:
            info = tarfile.TarInfo(DIR)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple) and data[0] == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            elif isinstance(data, tuple) and data[0] == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def good_members(d: RestoreDisk, order=None, zero=(1,)) -> list[tuple]:
    data = contents(d, zero)
    indices = order if order is not None else sorted(data)
    return [(f"{DIR}/{i:08d}", data[i]) for i in indices] + [(f"{DIR}/manifest.json", manifest(d))]


def expected_image(d: RestoreDisk, zero=(1,)) -> bytes:
    data = contents(d, zero)
    return b"".join(data[i] or bytes(min(d.segment_size, d.virtual_size - i * d.segment_size))
                    for i in range(d.segment_count))


def parse_into_file(tmp_path, d: RestoreDisk, stream: bytes):
    path = tmp_path / "out.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        read = parse_segments(io.BytesIO(stream), d, SparseFileOutput(fd, d.virtual_size), "disk vda")
    finally:
        os.close(fd)
    return path, read


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


# --- the content ------------------------------------------------------------------------------


def test_segments_in_any_order_become_the_raw_image_with_holes_for_zero_segments_and_zero_blocks(tmp_path):
    d = disk()
    path, read = parse_into_file(tmp_path, d, make_tar(good_members(d, order=[3, 0, 2, 1])))
    assert path.read_bytes() == expected_image(d)
    assert (read.data_segments, read.zero_segments) == (3, 1)
    # segment 1 (a 0-byte member) and the first 4 KiB of each data segment are holes
    assert allocated(path) <= d.virtual_size - SEG - 3 * 4096


def test_a_stream_without_a_directory_member_as_restic_dumps_it_is_read_too(tmp_path):
    d = disk()
    path, _read = parse_into_file(tmp_path, d, make_tar(good_members(d), directory=False))
    assert path.read_bytes() == expected_image(d)


def test_a_device_gets_every_byte_zeros_included(tmp_path):
    d = disk()
    path = tmp_path / "device"
    path.write_bytes(b"\xff" * d.virtual_size)  # old content a zero segment must overwrite
    fd = os.open(path, os.O_WRONLY)
    try:
        read = parse_segments(io.BytesIO(make_tar(good_members(d))), d, DenseOutput(fd), "disk vda")
    finally:
        os.close(fd)
    assert path.read_bytes() == expected_image(d)
    assert read.bytes_written == d.virtual_size


# --- what is refused ----------------------------------------------------------------------------


def refused(tmp_path, d, members, match, **kw):
    with pytest.raises(UsageError, match=match):
        parse_into_file(tmp_path, d, make_tar(members, **kw))


def test_a_segment_of_another_length_is_refused(tmp_path):
    d = disk()
    members = good_members(d)
    members[0] = (members[0][0], members[0][1][:-1])
    refused(tmp_path, d, members, "holds 65535 bytes, not 65536")


def test_the_last_segment_must_have_the_remaining_length(tmp_path):
    d = disk()
    members = good_members(d)
    members[3] = (members[3][0], members[3][1] + b"x")
    refused(tmp_path, d, members, "holds 4097 bytes, not 4096")


@pytest.mark.parametrize("name", [f"{DIR}/00000004", f"{DIR}/0000001", f"{DIR}/000000001", f"{DIR}/notes.txt",
                                  f"{DIR}/sub/00000000", f"{DIR}2/00000000", "etc/cron.d/x", f"{DIR}/+0000001"])
def test_a_member_that_does_not_belong_is_refused(tmp_path, name):
    d = disk()
    refused(tmp_path, d, good_members(d) + [(name, b"")], "in the segment directory; refused")


def test_a_symlink_or_a_directory_named_like_a_segment_is_refused(tmp_path):
    d = disk()
    members = good_members(d)
    refused(tmp_path, d, members[1:] + [(members[0][0], ("symlink", "/etc/shadow"))], "a symlink")
    refused(tmp_path, d, members[1:] + [(members[0][0], ("dir",))], "a directory")


def test_a_segment_twice_is_refused(tmp_path):
    d = disk()
    members = good_members(d)
    refused(tmp_path, d, members + [members[2]], "twice")


def test_a_missing_segment_is_refused_naming_the_first(tmp_path):
    d = disk()
    members = good_members(d)
    refused(tmp_path, d, members[:2] + members[3:], "lacks 1 of 4 segments .the first: 00000002")


def test_a_missing_manifest_is_refused(tmp_path):
    d = disk()
    refused(tmp_path, d, good_members(d)[:-1], "no manifest.json")


@pytest.mark.parametrize("change", [{"virtual_size": 5}, {"segment_size": 2 * SEG}, {"segment_count": 9},
                                    {"format": "qcow2"}, {"target": "vdb"}, {"kvm_borg_segments": 2},
                                    {"virtual_size": True}])
def test_a_manifest_that_disagrees_with_meta_json_is_refused(tmp_path, change):
    d = disk()
    members = good_members(d)
    members[-1] = (members[-1][0], manifest(d, **change))
    refused(tmp_path, d, members, "manifest.json says")


def test_a_manifest_that_is_not_json_is_refused(tmp_path):
    d = disk()
    members = good_members(d)
    members[-1] = (members[-1][0], b"\xff{")
    refused(tmp_path, d, members, "not valid JSON")


def test_a_stream_that_is_not_tar_is_refused(tmp_path):
    with pytest.raises(UsageError, match="not a readable tar stream"):
        parse_into_file(tmp_path, disk(), b"garbage" * 200)
    with pytest.raises(UsageError, match="not a readable tar stream"):
        parse_into_file(tmp_path, disk(), b"")


def test_member_kind_and_manifest_problem_are_exact():
    assert member_kind(f"/{DIR}", True, False, DIR, 4) == ("dir", None)
    assert member_kind(DIR, False, True, DIR, 4) is None
    assert member_kind(f"{DIR}/00000003", False, True, DIR, 4) == ("segment", 3)
    assert member_kind(f"{DIR}/manifest.json", False, True, DIR, 4) == ("manifest", None)
    assert member_kind(f"{DIR}/manifest.json", True, False, DIR, 4) is None
    assert manifest_problem([], disk()) == "is not a JSON object"
    assert manifest_problem(json.loads(manifest(disk())), disk()) is None


# --- the thread between the backend's child and the parser -----------------------------------


class FakeBackend:
    """Stands in for a backend's stream_tar only: passes a prepared stream in pieces, like a child's pipe."""

    def __init__(self, stream: bytes, piece=50_000, fail_after=None):
        self.stream, self.piece, self.fail_after = stream, piece, fail_after
        self.passed = 0

    def stream_tar(self, archive, archive_path, write):
        assert archive_path == DIR
        for start in range(0, len(self.stream), self.piece):
            if self.fail_after is not None and start >= self.fail_after:
                raise RuntimeError("the child failed")
            write(self.stream[start:start + self.piece])
            self.passed = start + self.piece


def test_read_segments_writes_what_the_backend_streams(tmp_path):
    d = disk(virtual_size=40 * SEG + 512)
    stream = make_tar(good_members(d, zero=(5, 6)) + [], directory=True) + bytes(10240)  # borg's record padding
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        read = read_segments(FakeBackend(stream), "a1", d, SparseFileOutput(fd, d.virtual_size))
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == expected_image(d, zero=(5, 6))
    assert read.zero_segments == 2


def test_a_refusal_stops_the_backends_stream_at_once(tmp_path):
    d = disk(virtual_size=200 * SEG)
    members = good_members(d)
    members.insert(1, (f"{DIR}/evil", b"x"))
    backend = FakeBackend(make_tar(members), piece=SEG)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(UsageError, match="evil"):
            read_segments(backend, "a1", d, SparseFileOutput(fd, d.virtual_size))
    finally:
        os.close(fd)
    assert backend.passed < len(backend.stream) // 2


def test_the_backends_own_failure_wins_over_the_cut_stream(tmp_path):
    d = disk(virtual_size=50 * SEG)
    backend = FakeBackend(make_tar(good_members(d)), fail_after=10 * SEG)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(RuntimeError, match="the child failed"):
            read_segments(backend, "a1", d, SparseFileOutput(fd, d.virtual_size))
    finally:
        os.close(fd)

