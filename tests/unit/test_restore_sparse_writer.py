"""SparseWriter (kvm_borg.sparse, used by restore and the restic backend): the bytes restored are the bytes stored, all-zero blocks become holes."""

from __future__ import annotations

import os
import random

import pytest

from kvm_borg.sparse import BLOCK, SEGMENT, SparseWriter, dig_holes, zero_runs


def _stream(rng: random.Random) -> tuple[bytes, int]:
    """A stream mixing data blocks, aligned zero blocks and segments, zeros that do not fill an aligned
    block, and a short tail; return it and the number of its aligned all-zero blocks."""
    parts, zero_blocks = [], 0
    for _ in range(rng.randrange(20, 60)):
        kind = rng.choice(["data", "zero-block", "zero-segment", "unaligned-zeros"])
        if kind == "data":
            parts.append(rng.randbytes(BLOCK * rng.randrange(1, 40)))
        elif kind == "zero-block":
            parts.append(bytes(BLOCK * rng.randrange(1, 5)))
        elif kind == "zero-segment":
            parts.append(bytes(SEGMENT * rng.randrange(1, 3)))
        else:  # 4 KiB of zeros straddling two blocks, framed by data: must be written, not a hole
            parts.append(b"\x01" * 2048 + bytes(BLOCK) + b"\x02" * 2048)
    parts.append(rng.choice([b"", b"\x03" * rng.randrange(1, BLOCK), bytes(rng.randrange(1, BLOCK))]))
    data = b"".join(parts)
    for start in range(0, len(data) - len(data) % BLOCK, BLOCK):
        zero_blocks += data[start:start + BLOCK] == bytes(BLOCK)
    return data, zero_blocks


@pytest.mark.parametrize("seed", range(8))
def test_sparse_writer_restores_every_byte_and_leaves_exactly_the_aligned_zero_blocks_out(tmp_path, seed):
    rng = random.Random(seed)
    data, zero_blocks = _stream(rng)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    writer = SparseWriter(fd)
    position = 0
    while position < len(data):  # pieces of any size and type, as a pipe delivers them
        size = rng.choice([1, 100, BLOCK - 1, BLOCK, 65536, 65536 + 7, 1 << 20])
        piece = data[position:position + size]
        writer.write(rng.choice([bytes, bytearray, memoryview])(piece))
        position += size
    assert writer.close() == len(data)
    os.close(fd)
    assert path.read_bytes() == data
    assert writer.written == len(data) - zero_blocks * BLOCK  # a tail shorter than a block is written


def test_sparse_writer_of_an_all_zero_stream_writes_nothing(tmp_path):
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    writer = SparseWriter(fd)
    for _ in range(64):
        writer.write(bytes(65536))
    assert writer.close() == 64 * 65536
    os.close(fd)
    assert writer.written == 0
    assert path.stat().st_size == 64 * 65536 and path.stat().st_blocks == 0


def test_sparse_writer_hands_what_it_restored_to_writeback_in_steps(tmp_path, monkeypatch):
    from kvm_borg import sparse

    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: (
        advised.append((offset, length, advice)), real(fd, offset, length, advice))[1])
    monkeypatch.setattr(sparse, "WRITEBACK", 1 << 20)
    data = random.Random(9).randbytes(5 << 20) + bytes(65536)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    writer = SparseWriter(fd)
    for start in range(0, len(data), 65536 + 100):
        writer.write(data[start:start + 65536 + 100])
    writer.close()
    os.close(fd)
    assert path.read_bytes() == data
    assert all(advice == os.POSIX_FADV_DONTNEED for _o, _l, advice in advised)
    covered = [(offset, offset + length) for offset, length, _a in advised]
    assert covered[0][0] == 0 and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # in order, no gap
    assert covered[-1][1] >= 5 << 20 and all(end - start >= 1 << 20 for start, end in covered)


# --- dig_holes: the same holes in a file another tool wrote (borg extract --sparse) ---------------------


def test_dig_holes_makes_every_aligned_zero_block_a_hole_and_keeps_the_content(tmp_path):
    MiB = 1 << 20
    path = tmp_path / "extracted.raw"
    pieces = [(3 * MiB + 512, os.urandom(5 * MiB)),  # unaligned data with zeros written around it
              (12 * MiB, b"\0" * 8192 + os.urandom(4096) + b"\0" * (MiB - 12288)),  # a 4 KiB island
              (20 * MiB + 100, b"x")]  # one byte: its block stays
    with open(path, "wb") as handle:
        handle.write(b"\0" * 24 * MiB)  # every byte written as data, as borg writes a chunk that is not all zero
        for offset, data in pieces:
            handle.seek(offset)
            handle.write(data)
        handle.truncate(26 * MiB)  # and a hole borg made itself at the end
    expected = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        punched = dig_holes(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == expected
    allocated = os.stat(path).st_blocks * 512
    data = 5 * MiB + 4096 + 4096 + 4096  # the run (its two partial blocks), the island, the byte's block
    assert allocated <= data + 8192, (allocated, data)
    assert punched >= 24 * MiB - data - 8192


def test_dig_holes_of_a_file_without_zero_blocks_changes_nothing(tmp_path):
    path = tmp_path / "random.raw"
    path.write_bytes(os.urandom(3 * (1 << 20) + 17))
    before = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        assert dig_holes(fd) == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == before


def test_the_zero_block_prefilter_never_misses_an_aligned_zero_block():
    from kvm_borg.sparse import first_words

    def maybe_zero_blocks(data, length):
        return 0 in first_words(data, length)

    dense = b"\x01" * (BLOCK * 8)
    assert not maybe_zero_blocks(dense, len(dense))
    with_block = dense[:BLOCK * 3] + bytes(BLOCK) + dense[BLOCK * 4:]
    assert maybe_zero_blocks(with_block, len(with_block))
    assert maybe_zero_blocks(bytearray(with_block), len(with_block))
    # 4 KiB of zeros across two blocks, ending 4 bytes into the second: no aligned block is all zero
    unaligned = b"\x01" * 4 + bytes(BLOCK) + b"\x01" * (BLOCK - 4)
    assert not maybe_zero_blocks(unaligned, len(unaligned))
    starts_zero = b"\x01" * 100 + bytes(BLOCK) + b"\x01" * (BLOCK - 100)  # block 2 starts with zeros: a closer look
    assert maybe_zero_blocks(starts_zero, len(starts_zero))
    assert not maybe_zero_blocks(bytes(BLOCK - 1), BLOCK - 1)  # a partial block is never a hole
    assert not maybe_zero_blocks(with_block, BLOCK * 3)  # only the bytes that count are looked at


def _reference_zero_runs(data: bytes, length: int) -> list[tuple[int, int]]:
    """The maximal runs of whole aligned all-zero blocks in data[:length], block by block."""
    runs: list[tuple[int, int]] = []
    for start in range(0, length - length % BLOCK, BLOCK):
        if data[start:start + BLOCK] == bytes(BLOCK):
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + BLOCK)
            else:
                runs.append((start, start + BLOCK))
    return runs


@pytest.mark.parametrize("seed", range(8))
def test_zero_runs_are_exactly_the_maximal_runs_of_aligned_zero_blocks(seed):
    rng = random.Random(seed)
    data, _ = _stream(rng)
    # blocks that start with 8 zero bytes but are not all zeros: looked at closely, never a run
    data += b"".join(bytes(8) + rng.randbytes(BLOCK - 8) for _ in range(3)) + bytes(SEGMENT) + b"\x04"
    for length in (len(data), len(data) - rng.randrange(1, BLOCK), SEGMENT + BLOCK, BLOCK - 1):
        assert list(zero_runs(data, length)) == _reference_zero_runs(data, length), length
    assert list(zero_runs(bytes(3 * SEGMENT + BLOCK), 3 * SEGMENT + BLOCK)) == [(0, 3 * SEGMENT + BLOCK)]
    assert list(zero_runs(bytes(b | 1 for b in rng.randbytes(SEGMENT)), SEGMENT)) == []  # no zero byte at all
