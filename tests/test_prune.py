"""`kvm-borg prune` against a real borg repository seeded with archives of known dates.

Old archives are seeded with `borg create --timestamp` and kvm-borg's archive comment, next to a
real backup of a running domain (the newest archive), another domain whose name extends the
first one's, and archives kvm-borg did not make."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from harness import DiskSpec, run_cli
from support import borg, borg_archives, cli_env, write_config

from kvm_borg import retention

# Seeded archives of the domain under test (UTC). With keep_daily 3, keep_weekly 2,
# keep_monthly 2 and a real backup taken today as the newest archive, borg keeps:
#   daily:   today, 2024-03-10 20:00 (newest of that day), 2024-03-09
#   weekly:  2024-03-01 (ISO week 9; week 10 already has a kept archive), 2024-02-20 (week 8)
#   monthly: 2024-01-15 (2024-03 and 2024-02 already have kept archives; then the rule runs out)
SEEDED = ["2024-03-10T20:00:00", "2024-03-10T08:00:00", "2024-03-09T08:00:00", "2024-03-08T08:00:00",
          "2024-03-07T08:00:00", "2024-03-01T08:00:00", "2024-02-20T08:00:00", "2024-02-05T08:00:00",
          "2024-01-15T08:00:00"]
EXPECTED_KEPT_SEEDED = {"2024-03-10T20:00:00": "keep_daily", "2024-03-09T08:00:00": "keep_daily",
                        "2024-03-01T08:00:00": "keep_weekly", "2024-02-20T08:00:00": "keep_weekly",
                        "2024-01-15T08:00:00": "keep_monthly"}
POLICY = {"keep_daily": 3, "keep_weekly": 2, "keep_monthly": 2}
# The other domain (name = first domain + "-2") keeps only its newest archive (domains_retention).
SEEDED_OTHER = ["2024-03-10T09:00:00", "2024-03-09T09:00:00", "2024-03-08T09:00:00"]


def archive_name(domain: str, when: str) -> str:
    return f"{domain}-{when.replace('-', '').replace(':', '')}Z"


def seed(repo, base_dir, domain: str, when: str, *, comment: bool = True, name: str | None = None) -> str:
    """Create one small archive in `repo` at time `when`, marked as kvm-borg's for `domain` unless comment=False."""
    name = name or archive_name(domain, when)
    payload = base_dir / "payload.txt"
    payload.write_text(f"{name}\n")
    args = ["create", "--timestamp", when]
    if comment:
        marker = json.dumps({"kvm_borg": 1, "domain": domain, "disks": ["vda"], "host": "seed"})
        args += ["--comment", marker.replace("{", "{{").replace("}", "}}")]
    borg(*args, f"{repo}::{name}", payload, base_dir=base_dir)
    return name


def test_prune_keeps_exactly_what_the_policy_says_and_nothing_else_is_touched(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], name="prune")
    other = f"{domain.name}-2"
    repo = tmp_path / "repo"
    config = write_config(image_dir / "kb", repo_path=repo, retention=POLICY,
                          domains_retention={other: {"keep_last": 1}})
    backup = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert backup.returncode == 0, backup.stderr
    newest = json.loads(backup.stdout)["domains"][0]["stores"][0]["archive"]

    base_dir = tmp_path / "borg-base"
    base_dir.mkdir()
    seeded = {when: seed(repo, base_dir, domain.name, when) for when in SEEDED}
    seeded_other = {when: seed(repo, base_dir, other, when) for when in SEEDED_OTHER}
    foreign = [seed(repo, base_dir, domain.name, "2024-03-10T10:00:00", comment=False, name=f"{domain.name}-manual"),
               seed(repo, base_dir, domain.name, "2023-12-01T00:00:00", comment=False, name="host-etc-2023-12-01")]
    before = set(borg_archives(repo))

    # The policy as kvm_borg.retention states it gives the same answer as the hand count above.
    times = {name: datetime.fromisoformat(when).replace(tzinfo=timezone.utc) for when, name in seeded.items()}
    times[newest] = datetime.now(timezone.utc)
    expected = {seeded[when]: rule for when, rule in EXPECTED_KEPT_SEEDED.items()} | {newest: "keep_daily"}
    assert retention.kept_archives(times, retention.merge_policy(POLICY)) == expected

    dry = run_cli("prune", "--dry-run", "--json", config=config, env=cli_env())
    assert dry.returncode == 0, dry.stderr
    assert set(borg_archives(repo)) == before  # a dry run deletes nothing
    [dry_outcome] = json.loads(dry.stdout)
    dry_results = {r["domain"]: r for r in dry_outcome["results"]}
    assert set(dry_results) == {domain.name, other}  # the domains with kvm-borg archives, never "host-etc"
    assert dry_results[domain.name]["kept"] == expected

    proc = run_cli("prune", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    [outcome] = json.loads(proc.stdout)
    assert outcome["compacted"] and outcome["error"] is None
    results = {r["domain"]: r for r in outcome["results"]}
    assert results[domain.name]["kept"] == expected
    assert sorted(results[domain.name]["pruned"]) == sorted(set(seeded.values()) - set(expected))
    assert results[other]["kept"] == {seeded_other["2024-03-10T09:00:00"]: "keep_last"}

    after = set(borg_archives(repo))
    assert after == set(expected) | {seeded_other["2024-03-10T09:00:00"]} | set(foreign)

    # Run again: nothing more to delete (the policy is stable).
    again = json.loads(run_cli("prune", domain.name, "--json", config=config, env=cli_env()).stdout)
    assert again[0]["results"][0]["pruned"] == [] and not again[0]["compacted"]


def test_prune_refuses_a_domain_whose_archive_names_a_foreign_archive_matches(tmp_path):
    repo = tmp_path / "repo"
    config = write_config(tmp_path / "kb", repo_path=repo, plugins=(), retention={"keep_last": 1})
    base_dir = tmp_path / "borg-base"
    base_dir.mkdir()
    mine = [seed(repo, base_dir, "web", when) for when in ("2024-03-01T00:00:00", "2024-03-02T00:00:00")]
    impostor = seed(repo, base_dir, "web", "2024-03-03T00:00:00", comment=False)  # named like ours, not ours
    other = [seed(repo, base_dir, "db", when) for when in ("2024-03-01T00:00:00", "2024-03-02T00:00:00")]

    proc = run_cli("prune", "--json", config=config, env=cli_env())
    assert proc.returncode == 2
    results = {r["domain"]: r for r in json.loads(proc.stdout)[0]["results"]}
    assert not results["web"]["ok"] and impostor in results["web"]["error"]
    assert results["db"]["ok"] and results["db"]["pruned"] == [other[0]]
    assert set(borg_archives(repo)) == set(mine) | {impostor, other[1]}


def test_prune_after_backup_applies_the_domain_policy(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="prune after")
    repo = tmp_path / "repo"
    config = write_config(image_dir / "kb", repo_path=repo, prune_after_backup=True,
                          domains_retention={domain.name: {"keep_last": 1}})
    base_dir = tmp_path / "borg-base"
    base_dir.mkdir()
    old = seed(repo, base_dir, domain.name, "2024-01-01T00:00:00")
    foreign = seed(repo, base_dir, domain.name, "2024-01-02T00:00:00", comment=False, name="unrelated-archive")
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    archive = json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]
    assert set(borg_archives(repo)) == {archive, foreign}
    assert old not in borg_archives(repo)
