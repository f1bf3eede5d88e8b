"""An image whose holes move but whose bytes do not is stored again as (almost) nothing.

borg's fixed chunker with `--sparse` cuts every data or hole range of a file from that range's
own start, so a hole that appears, disappears or moves at an offset that is not a multiple of the
chunk size shifts every later chunk boundary: nothing after it deduplicates and the whole rest of
the image is stored again. Images change their holes without any guest write (QEMU and the host
file system allocate and punch ranges; guests discard), so kvm-borg reads images without
`--sparse`: chunks stay at fixed offsets and all-zero chunks are still never stored.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvm_borg.backends.borg.repository import BorgRepository
from kvm_borg.models import ArchiveRequest

MiB = 1 << 20
HOLE_AT, HOLE_SIZE = MiB + 8192, 65536  # not aligned to the 4 MiB chunks
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def punch_hole(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, 1 | 2, ctypes.c_long(offset), ctypes.c_long(length)) != 0:  # KEEP_SIZE|PUNCH_HOLE
            pytest.fail(f"fallocate(PUNCH_HOLE) failed: {os.strerror(ctypes.get_errno())}")
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_with_zeros(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def holes(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    found, offset, size = [], 0, os.fstat(fd).st_size
    try:
        while offset < size:
            start = os.lseek(fd, offset, os.SEEK_HOLE)
            if start >= size:
                break
            try:
                end = os.lseek(fd, start, os.SEEK_DATA)
            except OSError:
                end = size
            found.append((start, end))
            offset = end
    finally:
        os.close(fd)
    return found


@pytest.fixture
def repository(tmp_path, monkeypatch):
    monkeypatch.setenv("BORG_BASE_DIR", str(tmp_path / "borg-base"))
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("kbtest-holes\n")
    passphrase.chmod(0o600)
    settings = SimpleNamespace(borg_binary=str(Path(sys.executable).parent / "borg"), progress=False)
    backend = BorgRepository({"name": "test", "type": "borg", "path": str(tmp_path / "repo"),
                              "passphrase_file": str(passphrase), "lock_wait": 5}, settings)  # kvm-borg's defaults
    backend.init()
    return backend


def store(backend: BorgRepository, image: Path, timestamp: str) -> int:
    """Back `image` up the way `kvm-borg backup` does; return the bytes the archive added."""
    comment = json.dumps({"kvm_borg": 1, "domain": "web", "disks": ["vda"], "host": "testhost"})
    result = backend.store(ArchiveRequest(domain="web", archive_name=f"web-{timestamp}", timestamp=timestamp,
                                          files=(str(image),), block_devices=(), comment=comment,
                                          total_bytes=image.stat().st_size))
    assert result.ok, result.error
    return result.deduplicated_size


def test_moving_holes_without_changing_a_byte_adds_almost_nothing(tmp_path, repository):
    image = tmp_path / "vda.img"
    image.write_bytes(random.Random(1).randbytes(12 * MiB))
    fill_with_zeros(image, HOLE_AT, HOLE_SIZE)
    punch_hole(image, HOLE_AT, HOLE_SIZE)
    assert holes(image), "this file system cannot punch holes; the test needs one that can"
    content = image.read_bytes()

    first = store(repository, image, "20261126T000001Z")
    assert first > 10 * MiB

    fill_with_zeros(image, HOLE_AT, HOLE_SIZE)  # the hole is gone, the bytes are the same
    assert image.read_bytes() == content and not holes(image)
    assert store(repository, image, "20261126T000002Z") < MiB

    punch_hole(image, HOLE_AT + 4096, 8192)  # a new, smaller hole elsewhere
    assert image.read_bytes() == content and holes(image)
    assert store(repository, image, "20261126T000003Z") < MiB
