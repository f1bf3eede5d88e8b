"""content_size: the bytes a reader of a file gets, holes included (the block-device case runs in
tests/test_restic_backend.py, which stores a real block device)."""

from __future__ import annotations

import os

import pytest

from kvm_borg.sizes import content_size


def test_a_files_size_is_its_length_holes_included(tmp_path):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as handle:
        handle.write(b"x" * 100)
        handle.truncate(1 << 30)  # 1 GiB, nearly all hole
    assert content_size(str(path)) == 1 << 30
    link = tmp_path / "link"
    link.symlink_to(path)
    assert content_size(str(link)) == 1 << 30


def test_an_empty_file_has_size_zero(tmp_path):
    path = tmp_path / "empty"
    path.touch()
    assert content_size(str(path)) == 0


def test_a_missing_path_is_an_oserror_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        content_size(str(tmp_path / "missing"))
    assert caught.value.filename == os.fspath(tmp_path / "missing")
