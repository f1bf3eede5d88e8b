"""kvm_borg.restore_files: a stored file streamed into place beside its destination (real files in a
temporary directory; the backend is a stand-in that hands over bytes, as borg's and restic's
stream_file do)."""

from __future__ import annotations

import os

import pytest

from kvm_borg.models import BackendBase
from kvm_borg.restore_files import make_dirs, rebase_argv, restore_file, write_text

BLOCK = 64 * 1024


class Chunks(BackendBase):
    """Hands over a stored file in the chunks given; `fail_after` chunks, raises like a broken pipe."""

    def __init__(self, chunks, fail_after=None):
        super().__init__({"name": "r", "type": "stand-in"}, None)
        self.chunks, self.fail_after = chunks, fail_after

    def stream_file(self, archive, archive_path, write):
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_after:
                raise OSError("stream broken")
            write(chunk)


def test_an_image_is_written_sparse_with_its_size_and_root_0600(tmp_path):
    data = [b"\0" * BLOCK * 4, b"x" * BLOCK, b"\0" * BLOCK * 4]
    destination = str(tmp_path / "new" / "dir" / "disk.raw")
    assert restore_file(Chunks(data), "a", "disk.raw", destination) == BLOCK * 9
    st = os.stat(destination)
    assert st.st_size == BLOCK * 9 and st.st_mode & 0o7777 == 0o600
    assert st.st_blocks * 512 < BLOCK * 9  # holes where the zeros were
    assert open(destination, "rb").read() == b"".join(data)
    assert os.stat(tmp_path / "new").st_mode & 0o7777 == 0o711


def test_a_replaced_file_keeps_its_local_mode_and_a_broken_stream_leaves_it_untouched(tmp_path):
    destination = tmp_path / "nvram.fd"
    destination.write_bytes(b"old")
    os.chmod(destination, 0o640)
    assert restore_file(Chunks([b"new"]), "a", "nvram.fd", str(destination), sparse=False) == 3
    assert destination.read_bytes() == b"new" and os.stat(destination).st_mode & 0o7777 == 0o640
    with pytest.raises(OSError, match="stream broken"):
        restore_file(Chunks([b"half", b"rest"], fail_after=1), "a", "nvram.fd", str(destination))
    assert destination.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvram.fd"]  # no temp file left behind


def test_a_planted_symlink_at_the_destination_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "domain.xml").symlink_to(victim)
    write_text(str(tmp_path / "domain.xml"), "<domain/>")
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "domain.xml").is_symlink() and (tmp_path / "domain.xml").read_text() == "<domain/>"


def test_make_dirs_leaves_existing_directories_alone(tmp_path):
    os.chmod(tmp_path, 0o755)
    make_dirs(str(tmp_path / "a" / "b"))
    assert os.stat(tmp_path).st_mode & 0o7777 == 0o755
    assert os.stat(tmp_path / "a" / "b").st_mode & 0o7777 == 0o711


def test_rebase_names_both_formats_so_nothing_is_probed():
    assert rebase_argv("/r/top.qcow2", "qcow2", "/r/base.raw", "raw") == [
        "qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "/r/base.raw", "-F", "raw", "/r/top.qcow2"]
