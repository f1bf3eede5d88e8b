"""The harness's small helpers: `tmpfs` (always unmounted again), `wait_for`, `start_cli`, `start_borg` and the
production PYTHONPATH of the programs the tests start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import BORG_BIN, start_borg, start_cli, tmpfs, wait_for
from kvm_borg import mountinfo


def test_tmpfs_mounts_with_size_and_options_and_unmounts_on_leaving(tmp_path):
    with tmpfs(tmp_path / "small", "1m", "mode=0750", "nosuid") as point:
        assert point == tmp_path / "small"
        entry = mountinfo.entry_at(str(point))
        assert entry.fs_type == "tmpfs" and "nosuid" in entry.options
        assert (point.stat().st_mode & 0o777) == 0o750
        with pytest.raises(OSError):  # 1 MiB, as asked
            (point / "big").write_bytes(b"\0" * (2 << 20))
    assert str(point) not in mountinfo.mount_points()


def test_tmpfs_is_unmounted_when_the_body_fails(tmp_path):
    with pytest.raises(RuntimeError, match="the test failed"):
        with tmpfs(tmp_path / "small", "1m"):
            raise RuntimeError("the test failed")
    assert str(tmp_path / "small") not in mountinfo.mount_points()


def test_tmpfs_still_held_open_is_unmounted_lazily(tmp_path):
    with tmpfs(tmp_path / "busy", "1m") as point:
        handle = open(point / "open-file", "w")  # what a QEMU of a failed test would hold
    try:
        assert str(point) not in mountinfo.mount_points()
    finally:
        handle.close()


def test_wait_for_returns_once_the_condition_holds():
    calls = iter([False, False, True])
    wait_for(lambda: next(calls), "the third call", timeout=10, interval=0.01)


def test_wait_for_fails_naming_what_after_the_timeout():
    with pytest.raises(AssertionError, match="timed out waiting for nothing"):
        wait_for(lambda: False, "nothing", timeout=0.2, interval=0.01)


def test_wait_for_fails_at_once_when_the_process_exits_first():
    proc = subprocess.Popen([sys.executable, "-c", "print('bye'); raise SystemExit(3)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with pytest.raises(AssertionError, match=r"exited 3 before the file.*bye"):
        wait_for(lambda: False, "the file", timeout=60, proc=proc, interval=0.01)


def test_start_cli_runs_kvm_borg_with_pipes_and_the_extra_environment(tmp_path):
    proc = start_cli("--version", env={"KBTEST_UNUSED": "1"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("kvm-borg ") and proc.args[1:] == ["--version"]


def test_start_borg_runs_the_venvs_borg_without_waiting(tmp_path):
    proc = start_borg("check", tmp_path / "no-repository")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "does not exist" in err, (proc.returncode, err)
    assert proc.args[0].endswith("/borg")


def test_programs_the_tests_start_cannot_import_pytest_as_in_a_production_venv():
    from harness import borg_env
    from harness.cli import _merged_env

    for env in (borg_env(), _merged_env({"PYTHONPATH": "/elsewhere"})):
        proc = subprocess.run([sys.executable, "-c", "import pytest"], env=env, capture_output=True, text=True)
        assert proc.returncode == 1 and "pytest is hidden" in proc.stderr, proc.stderr
        assert env["PYTHONPATH"].split(":")[0].endswith("production_path")
    assert "/elsewhere" in _merged_env({"PYTHONPATH": "/elsewhere"})["PYTHONPATH"]
    assert borg_env()["BORG_FUSE_IMPL"] == "none"  # as kvm-borg's own borg runs but `borg mount`
    proc = subprocess.run([str(BORG_BIN), "--version"], env=borg_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("borg 1."), proc.stderr
