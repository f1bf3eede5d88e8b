"""The freeze marker: thaw removes exactly the paths freeze created in DIR/<domain>, nothing else."""

import os

import pytest

from kvm_borg.pipeline import exposure
from kvm_borg.models import RecoveryReport
from kvm_borg.errors import KvmBorgError


def _exposure(tmp_path):
    domain_dir = tmp_path / "vm"
    (domain_dir / "nvram").mkdir(parents=True)
    (domain_dir / "meta.json").write_text("{}")
    (domain_dir / "nvram" / "vm_VARS.fd").write_bytes(b"x")
    targets = [str(domain_dir / "disks" / "vda.qcow2"), str(domain_dir / "disks" / "vda.backing1")]
    files = exposure.created_paths(domain_dir, targets)
    for target in targets:  # what _bind_read_only creates later
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()
    return domain_dir, files


def test_created_paths_lists_files_dirs_and_the_mount_targets_to_come(tmp_path):
    _domain_dir, files = _exposure(tmp_path)
    assert files == ["disks", "disks/vda.backing1", "disks/vda.qcow2", "meta.json", "nvram", "nvram/vm_VARS.fd"]


def test_everything_listed_is_removed_and_the_directory_with_it(tmp_path):
    domain_dir, files = _exposure(tmp_path)
    (domain_dir / exposure.MARKER_NAME).write_text("{}")
    report = RecoveryReport("vm")
    exposure.remove_created(domain_dir, files, set(), report)
    assert not domain_dir.exists() and report.warnings == []


def test_a_foreign_file_is_kept_with_its_directories_and_a_warning(tmp_path):
    domain_dir, files = _exposure(tmp_path)
    (domain_dir / "disks" / "admin.txt").write_text("mine")
    report = RecoveryReport("vm")
    exposure.remove_created(domain_dir, files, set(), report)
    remaining = sorted(str(p.relative_to(domain_dir)) for p in domain_dir.rglob("*"))
    assert remaining == ["disks", "disks/admin.txt"]
    assert any("did not create" in w for w in report.warnings)


def test_paths_leaving_the_directory_are_never_followed(tmp_path):
    domain_dir, files = _exposure(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    exposure.remove_created(domain_dir, [*files, "../outside.txt", str(outside)], set(), RecoveryReport("vm"))
    assert outside.read_text() == "keep"


def test_a_listed_path_that_is_a_mount_point_stops_the_removal(tmp_path):
    domain_dir, files = _exposure(tmp_path)
    with pytest.raises(KvmBorgError, match="mount point"):
        exposure.remove_created(domain_dir, files, {str(domain_dir / "disks" / "vda.qcow2")}, RecoveryReport("vm"))
    assert (domain_dir / "disks" / "vda.qcow2").exists()


def test_a_marker_that_is_not_a_regular_file_or_not_ours_is_ignored(tmp_path):
    (tmp_path / "elsewhere").write_text('{"run": "r", "files": []}')
    os.symlink(tmp_path / "elsewhere", tmp_path / exposure.MARKER_NAME)
    assert exposure.read_marker(tmp_path) is None
    os.unlink(tmp_path / exposure.MARKER_NAME)
    (tmp_path / exposure.MARKER_NAME).write_text("[1, 2]")
    assert exposure.read_marker(tmp_path) is None
    (tmp_path / exposure.MARKER_NAME).write_text('{"run": "r", "files": ["meta.json"]}')
    assert exposure.read_marker(tmp_path) == {"run": "r", "files": ["meta.json"]}
