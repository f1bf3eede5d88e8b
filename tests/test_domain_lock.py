"""Domain locks are host-wide: two configurations with different state_dirs still never work on the
same domain at once (the lock lives under /run/kvm-borg/locks/, keyed by the domain UUID)."""

from __future__ import annotations

import os
import stat
import subprocess
import time

from harness import KVM_BORG_BIN, DiskSpec, run_cli
from harness.cli import _merged_env
from support import assert_back_on_own_images, borg_archives, cli_env, journal_entries, write_config

LOCK_DIR = "/run/kvm-borg/locks"


def _start_paused(config, domain, pause_file):
    """Start `kvm-borg backup` held at the `journal-written` failpoint; return the Popen once it waits."""
    env = _merged_env(cli_env(KVM_BORG_FAILPOINT=f"journal-written:pause={pause_file}"))
    proc = subprocess.Popen([str(KVM_BORG_BIN), "--config", str(config), "backup", domain.name], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # bounded wait, not a timing assertion
    while not pause_file.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "backup never reached the journal-written failpoint"
        time.sleep(0.1)
    return proc


def test_two_configs_with_different_state_dirs_exclude_each_other(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)])
    first_config = write_config(image_dir / "kb-a", repo_path=tmp_path / "repo-a")
    second_config = write_config(image_dir / "kb-b", repo_path=tmp_path / "repo-b")
    pause = tmp_path / "paused"
    first = _start_paused(first_config, domain, pause)
    try:
        second = run_cli("backup", domain.name, config=second_config, env=cli_env())
        assert second.returncode == 2, second.stderr
        assert f"being handled by another kvm-borg run (pid {first.pid})" in second.stderr
        assert journal_entries(image_dir / "kb-b" / "state") == []
        lock = os.path.join(LOCK_DIR, f"{domain.dom.UUIDString()}.lock")
        assert os.path.isfile(lock) and not os.path.islink(lock)
        info = os.lstat(LOCK_DIR)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == 0
        assert not (image_dir / "kb-a" / "state" / "locks" / f"{domain.dom.UUIDString()}.lock").exists()
    finally:
        pause.unlink(missing_ok=True)
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert len(borg_archives(tmp_path / "repo-a")) == 1 and borg_archives(tmp_path / "repo-b") == []
    assert_back_on_own_images(domain, image_dir / "kb-a" / "state")
