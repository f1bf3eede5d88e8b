"""`kvm-borg status` as a Nagios/Icinga check: 0 fresh, 1 last attempt failed, 2 stale or never backed up."""

from __future__ import annotations

import json
import subprocess
import time

from harness import BORG_BIN, DiskSpec, borg_env, run_cli
from support import cli_env, write_config


def rows(proc) -> dict[str, dict]:
    return {row["domain"]: row for row in json.loads(proc.stdout)["domains"]}


def test_status_reports_age_and_exits_2_for_a_stale_domain(domain_factory, image_dir, tmp_path):
    fresh = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="status fresh")
    never = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="status never")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", max_age="1h")
    backup = run_cli("backup", fresh.name, "--json", config=config, env=cli_env())
    assert backup.returncode == 0, backup.stderr
    stored = json.loads(backup.stdout)["domains"][0]["stores"][0]

    ok = run_cli("status", fresh.name, "--json", config=config, env=cli_env())
    assert ok.returncode == 0, ok.stderr
    row = rows(ok)[fresh.name]
    assert row["repository"] == "main" and row["archive"] == stored["archive"] and not row["stale"]
    assert 0 <= row["age_seconds"] < 600 and row["last_size"] == stored["original_size"]
    assert row["archive_count"] is None  # unknown until a prune or --refresh counted them
    text = run_cli("status", fresh.name, config=config, env=cli_env())
    assert text.returncode == 0 and text.stdout.startswith("OK: 1 domains backed up within 1h0m")

    refreshed = run_cli("status", fresh.name, "--refresh", "--json", config=config, env=cli_env())
    assert refreshed.returncode == 0 and rows(refreshed)[fresh.name]["archive_count"] == 1

    time.sleep(2)
    stale = run_cli("status", fresh.name, "--max-age", "1s", config=config, env=cli_env())
    assert stale.returncode == 2
    assert stale.stdout.startswith("CRITICAL: no backup within 0m:") and fresh.name in stale.stdout.splitlines()[0]

    never_backed_up = run_cli("status", fresh.name, never.name, "--json", config=config, env=cli_env())
    assert never_backed_up.returncode == 2
    assert rows(never_backed_up)[never.name]["stale"] and rows(never_backed_up)[never.name]["age_seconds"] is None
    assert not rows(never_backed_up)[fresh.name]["stale"]


def test_status_warns_when_the_last_attempt_failed_and_answers_while_the_repository_is_locked(
        domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="status locked")
    repo = tmp_path / "repo"
    config = write_config(image_dir / "kb", repo_path=repo)
    assert run_cli("backup", domain.name, config=config, env=cli_env()).returncode == 0
    # Hold the repository's lock the way a long backup does; the next backup fails on it.
    holder = subprocess.Popen([str(BORG_BIN), "with-lock", str(repo), "sleep", "60"], env=borg_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60  # bounded wait for the holder to have the lock
        while not any((repo / name).exists() for name in ("lock.exclusive", "lock.roster")):
            assert holder.poll() is None and time.monotonic() < deadline, "borg with-lock never took the lock"
            time.sleep(0.1)
        # The same state and repository, with a short lock_wait so the backup gives up at once.
        config_short = write_config(image_dir / "kb2", repositories=[{
            "name": "main", "type": "borg", "path": str(repo), "lock_wait": 1,
            "passphrase_file": str(image_dir / "kb" / "passphrase")}], init=False,
            state_dir=str(image_dir / "kb" / "state"))
        failed = run_cli("backup", domain.name, config=config_short, env=cli_env())
        assert failed.returncode == 2
        # No repository access: a status that opened the locked repository would wait out its
        # lock_wait (60 s) and never end within this bounded wait (TimeoutExpired fails the test).
        status = run_cli("status", domain.name, config=config, env=cli_env(), timeout=30)
        assert status.returncode == 1
        assert status.stdout.startswith("WARNING: last attempt failed:") and "last attempt failed:" in status.stdout
    finally:
        holder.terminate()
        holder.wait(timeout=30)
