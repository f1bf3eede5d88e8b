"""`kvm-borg prune` and `check` on a real restic repository seeded with kvm-borg archives of known dates.

An archive in restic is a main snapshot plus one snapshot per block device, tied by tags: the
policy keeps or forgets whole archives, never half of one."""

from __future__ import annotations

import json
import subprocess

from harness import RESTIC_BIN, restic_env, run_cli
from support import cli_env, write_config, write_passphrase
from test_prune import POLICY, SEEDED, SEEDED_OTHER, archive_name

from kvm_borg.backends.restic import archives

HOST = "kbtest-restic-host"
# Without a backup of today, borg's rules keep (see test_prune for the walk): daily 03-10 20:00,
# 03-09, 03-08; weekly 03-01, 02-20; monthly 01-15.
EXPECTED_KEPT = {"2024-03-10T20:00:00": "keep_daily", "2024-03-09T08:00:00": "keep_daily",
                 "2024-03-08T08:00:00": "keep_daily", "2024-03-01T08:00:00": "keep_weekly",
                 "2024-02-20T08:00:00": "keep_weekly", "2024-01-15T08:00:00": "keep_monthly"}


def restic(*args, repo, cwd=None) -> subprocess.CompletedProcess:
    env = restic_env(extra={"RESTIC_REPOSITORY": str(repo), "TZ": "UTC"})
    return subprocess.run([str(RESTIC_BIN), *map(str, args)], env=env, capture_output=True, text=True, check=True,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def seed(repo, work, domain: str, when: str, *, device: bool = False, marker: bool = True) -> str:
    """Create one kvm-borg archive (main snapshot, plus a device snapshot with `device`) at time `when`."""
    name = archive_name(domain, when)
    comment = json.dumps({"kvm_borg": 1, "domain": domain, "disks": ["vda"], "host": HOST})
    payload = work / "meta.json"
    payload.write_text(name)
    time_arg = when.replace("T", " ")
    if device:
        tags = archives.archive_tags(domain, name, comment, archives.PART_DEVICE)
        subprocess.run([str(RESTIC_BIN), "backup", "--host", HOST, "--time", time_arg, "--stdin", "--stdin-filename",
                        "/dev/vg/disk", *[f for t in tags for f in ("--tag", t)]], input=name.encode(),
                       env=restic_env(extra={"RESTIC_REPOSITORY": str(repo), "TZ": "UTC"}), check=True,
                       capture_output=True)
    tags = archives.archive_tags(domain, name, comment, archives.PART_MAIN, size=len(name)) if marker else (archives.tag("domain", domain),)
    restic("backup", "--host", HOST, "--time", time_arg, *[f for t in tags for f in ("--tag", t)], payload, repo=repo)
    return name


def snapshot_archives(repo) -> list[tuple[str, str]]:
    """Return (archive or '-', part or '-') of every snapshot in the repository."""
    snapshots = json.loads(restic("snapshots", "--json", repo=repo).stdout) or []
    found = []
    for snapshot in snapshots:
        values = archives.parse_tags(snapshot.get("tags") or [])
        found.append((values.get("archive", "-"), values.get("part", "-")))
    return sorted(found)


def test_restic_prune_forgets_whole_archives_of_one_domain_and_check_reads_a_subset(tmp_path):
    repo = tmp_path / "restic-repo"
    passphrase = write_passphrase(tmp_path / "passphrase")
    domain, other = "web", "web-2"
    config = write_config(tmp_path / "kb", plugins=(), hostname=HOST, retention=POLICY,
                          domains_retention={other: {"keep_last": 1}},
                          repositories=[{"name": "r", "type": "restic", "url": str(repo),
                                         "passphrase_file": str(passphrase)}])
    work = tmp_path / "work"
    work.mkdir()
    seeded = {when: seed(repo, work, domain, when, device=(when == "2024-03-10T08:00:00")) for when in SEEDED}
    seeded_other = {when: seed(repo, work, other, when) for when in SEEDED_OTHER}
    seed(repo, work, domain, "2024-03-11T00:00:00", marker=False)  # tagged domain=web, but not kvm-borg's
    before = snapshot_archives(repo)
    assert (seeded["2024-03-10T08:00:00"], "device") in before

    dry = run_cli("prune", "--dry-run", "--json", config=config, env=cli_env())
    assert dry.returncode == 0, dry.stderr
    assert snapshot_archives(repo) == before

    proc = run_cli("prune", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    [outcome] = json.loads(proc.stdout)
    assert outcome["compacted"] and outcome["error"] is None
    results = {r["domain"]: r for r in outcome["results"]}
    expected = {seeded[when]: rule for when, rule in EXPECTED_KEPT.items()}
    assert results[domain]["kept"] == expected
    assert sorted(results[domain]["pruned"]) == sorted(set(seeded.values()) - set(expected))
    assert results[other]["kept"] == {seeded_other["2024-03-10T09:00:00"]: "keep_last"}

    after = snapshot_archives(repo)
    assert after == sorted([(name, "main") for name in expected] + [(seeded_other["2024-03-10T09:00:00"], "main")]
                           + [("-", "-")])  # the foreign snapshot stays; the pruned archive's device part is gone

    check = run_cli("check", "--read-data-subset", "25%", "--json", config=config, env=cli_env())
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout) == [{**json.loads(check.stdout)[0], "repository": "r", "ok": True,
                                         "mode": "read-data-subset=25%"}]
    full = run_cli("check", "--verify-data", "--json", config=config, env=cli_env())
    assert full.returncode == 0 and json.loads(full.stdout)[0]["mode"] == "verify-data"
