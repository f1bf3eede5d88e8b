"""kvm_borg.restore_files: a stored file streamed into place beside its destination (real files in a
temporary directory; the backend is a stand-in that hands over bytes, as borg's and restic's
stream_file do)."""

from __future__ import annotations

import os

import pytest

from kvm_borg.errors import UsageError
from kvm_borg.models import BackendBase
from kvm_borg.restore_files import (
    extraction_parts,
    make_dirs,
    rebase_argv,
    restore_file,
    write_text,
)

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


# --- the backend's own tool writes the image (borg extract --sparse into a private directory) ----------


class Extracts(BackendBase):
    """Writes the stored file below the private directory as `plant(workdir, archive_path)` says (a stand-in
    for borg extract, which writes what the archive holds); records the directories it was given."""

    def __init__(self, plant):
        super().__init__({"name": "r", "type": "stand-in"}, None)
        self.plant, self.workdirs = plant, []

    def extract_into(self, archive, archive_path, workdir):
        self.workdirs.append(workdir)
        assert os.stat(workdir).st_mode & 0o777 == 0o700 and os.listdir(workdir) == []
        self.plant(workdir, archive_path)
        return True


def _at(workdir, archive_path):
    path = os.path.join(workdir, archive_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _regular(data, mode=0o6777):
    def plant(workdir, archive_path):
        path = _at(workdir, archive_path)
        with open(path, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)  # the archive's mode: never kept
    return plant


def test_an_extracted_image_is_checked_holed_owned_locally_and_renamed_into_place(tmp_path):
    data = b"\0" * BLOCK * 4 + b"x" * BLOCK + b"\0" * BLOCK * 4  # written as data: holes are dug afterwards
    backend = Extracts(_regular(data))
    destination = str(tmp_path / "images" / "disk.raw")
    assert restore_file(backend, "a", "var/lib/libvirt/images/disk.raw", destination) == len(data)
    st = os.stat(destination)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (os.getuid(), os.getgid(), 0o600)
    assert st.st_blocks * 512 <= BLOCK * 2, st.st_blocks  # the zero blocks are holes
    assert open(destination, "rb").read() == data
    assert os.listdir(tmp_path / "images") == ["disk.raw"]  # the private directory is gone
    assert os.path.dirname(backend.workdirs[0]) == str(tmp_path / "images")  # beside it: same file system


def _symlink(target):
    def plant(workdir, archive_path):
        os.symlink(target, _at(workdir, archive_path))
    return plant


def _symlinked_parent(outside):
    def plant(workdir, archive_path):
        parent = os.path.join(workdir, os.path.dirname(archive_path))
        os.makedirs(os.path.dirname(parent), exist_ok=True)
        os.symlink(outside, parent)
        (outside / os.path.basename(archive_path)).write_bytes(b"outside")
    return plant


def _fifo(workdir, archive_path):
    os.mkfifo(_at(workdir, archive_path))


def _hard_link(outside):
    def plant(workdir, archive_path):
        os.link(outside / "victim", _at(workdir, archive_path))
    return plant


def _nothing(workdir, archive_path):
    pass


@pytest.mark.parametrize("plant", ["symlink", "symlinked parent", "fifo", "hard link", "nothing"])
def test_what_is_not_a_plain_regular_file_below_the_private_directory_is_refused(tmp_path, plant):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep")
    plants = {"symlink": _symlink(str(outside / "victim")), "symlinked parent": _symlinked_parent(outside),
              "fifo": _fifo, "hard link": _hard_link(outside), "nothing": _nothing}
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(UsageError, match=r"var/lib/disk.raw was not extracted as a regular file( \(.*\))?; refused"):
        restore_file(Extracts(plants[plant]), "a", "var/lib/disk.raw", str(target / "disk.raw"))
    assert os.listdir(target) == []  # nothing renamed into place, the private directory removed
    assert (outside / "victim").read_bytes() == b"keep"


def test_a_failing_extraction_leaves_nothing_and_the_old_file_untouched(tmp_path):
    destination = tmp_path / "disk.raw"
    destination.write_bytes(b"old")

    def broken(workdir, archive_path):
        _regular(b"half")(workdir, archive_path)
        raise OSError("borg extract failed")

    with pytest.raises(OSError, match="borg extract failed"):
        restore_file(Extracts(broken), "a", "x/disk.raw", str(destination))
    assert destination.read_bytes() == b"old" and os.listdir(tmp_path) == ["disk.raw"]


@pytest.mark.parametrize("path", ["/etc/shadow", "a/../../etc", "", "a//b", "./a", "a/."])
def test_a_stored_path_that_is_not_plain_and_relative_is_refused_before_extraction(path):
    with pytest.raises(UsageError, match="not a plain relative path"):
        extraction_parts(path)


def test_small_files_and_the_nvram_stream_never_go_through_the_tool(tmp_path):
    def forbidden(workdir, archive_path):
        raise AssertionError("extract_into used for a non-image file")

    backend = Extracts(forbidden)
    backend.stream_file = lambda archive, archive_path, write: write(b"VARS")
    assert restore_file(backend, "a", "nvram.fd", str(tmp_path / "nvram.fd"), sparse=False) == 4
