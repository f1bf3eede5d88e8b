"""`kvm-borg status --all-hosts`: every host's domains and their last backup, from a restic repository
the fleet shares and from borg repositories (one per host) listed in the monitoring host's config."""

from __future__ import annotations

import json
import time

from harness import DiskSpec, run_cli
from support import cli_env, write_config, write_passphrase


def test_status_all_hosts_lists_every_hosts_domains_from_shared_and_per_host_repositories(
        domain_factory, image_dir, tmp_path):
    passphrase = str(write_passphrase(tmp_path / "fleet.pass"))
    shared = {"name": "shared", "type": "restic", "url": str(tmp_path / "shared-restic"), "passphrase_file": passphrase}
    borg = {host: {"name": f"borg-{host}", "type": "borg", "path": str(tmp_path / f"borg-{host}"),
                   "passphrase_file": passphrase} for host in ("hv1", "hv2")}
    domains = {}
    for host in ("hv1", "hv2"):
        domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name=f"fleet status {host}")
        config = write_config(image_dir / host, [shared, borg[host]], hostname=host)
        backup = run_cli("backup", domain.name, config=config, env=cli_env())
        assert backup.returncode == 0, backup.stderr
        domains[host] = domain.name
    # The monitoring host: its own state, the shared repository and every host's borg repository.
    monitor = write_config(image_dir / "monitor", [shared, borg["hv1"], borg["hv2"]], init=False, hostname="mon")

    status = run_cli("status", "--all-hosts", "--json", config=monitor, env=cli_env())
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["domains"]
    assert [(r["host"], r["domain"], r["repository"], r["archive_count"], r["stale"]) for r in rows] == [
        ("hv1", domains["hv1"], "borg-hv1", 1, False), ("hv1", domains["hv1"], "shared", 1, False),
        ("hv2", domains["hv2"], "borg-hv2", 1, False), ("hv2", domains["hv2"], "shared", 1, False)]
    assert all(0 <= r["age_seconds"] < 600 and r["archive"] and r["last_size"] > 0 for r in rows)

    text = run_cli("status", "--all-hosts", "--repo", "shared", config=monitor, env=cli_env())
    assert text.returncode == 0 and text.stdout.startswith("OK: 2 hosts, 2 domains backed up within 1d2h")
    assert domains["hv2"] in text.stdout and "borg-hv1" not in text.stdout

    missing = run_cli("status", "--all-hosts", domains["hv1"], "nowhere", "--repo", "shared", "--json", config=monitor, env=cli_env())
    assert missing.returncode == 2
    assert [(r["domain"], r["host"], r["stale"]) for r in json.loads(missing.stdout)["domains"]][-1] == (
        "nowhere", None, True)

    time.sleep(2)
    stale = run_cli("status", "--all-hosts", "--max-age", "1s", "--repo", "shared", config=monitor, env=cli_env())
    assert stale.returncode == 2 and stale.stdout.startswith("CRITICAL: no backup within 0m:")
    assert f"{domains['hv2']} of hv2 in shared" in stale.stdout

    refused = run_cli("status", "--all-hosts", "--refresh", config=monitor, env=cli_env())
    assert refused.returncode == 2 and "--all-hosts" in refused.stderr and refused.stdout == ""
