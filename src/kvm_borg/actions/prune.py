"""`kvm-borg prune`: apply the retention policy to each domain's archives, then free the space.

Per repository and domain, only that domain's archives are candidates (borg: `prune
--glob-archives` with the domain's exact archive glob, then one `compact` per repository;
restic: `forget --tag domain=... --prune`). Archives kvm-borg did not make are never deleted.
The work is kvm_borg.pipeline.prune; this module parses the arguments and prints the outcomes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from kvm_borg.actions.common import Context, print_json, usable_repositories
from kvm_borg.errors import exit_code
from kvm_borg.pipeline.prune import failures, prune_repository, record_prunes

log = logging.getLogger(__name__)


def run_prune(ctx: Context, domains: list[str], repo_names: list[str] | None, dry_run: bool) -> list[dict]:
    """Given domain names (empty: all with archives), --repo names and --dry-run, prune every chosen repository
    (kvm_borg.pipeline.prune); return the outcomes, recorded in the run state unless a dry run."""
    outcomes = [prune_repository(ctx.settings, repo, backend, list(domains) or None, dry_run)
                for repo, backend in usable_repositories(ctx, repo_names)]
    if not dry_run:
        record_prunes(ctx.settings, outcomes)
    return outcomes


def as_json(outcomes: list[dict]) -> list[dict]:
    return [{**outcome, "results": [asdict(r) for r in outcome["results"]]} for outcome in outcomes]


def print_outcomes(outcomes: list[dict], dry_run: bool) -> None:
    verb = "would delete" if dry_run else "deleted"
    for outcome in outcomes:
        print(f"{outcome['repository']}:")
        for result in outcome["results"]:
            if not result.ok:
                print(f"  {result.domain}: FAILED: {result.error}")
                continue
            print(f"  {result.domain}: {len(result.kept)} kept, {len(result.pruned)} {verb}")
            for name, rule in sorted(result.kept.items()):
                print(f"    keep   {name}  ({rule})")
            for name in sorted(result.pruned):
                print(f"    {'prune' if dry_run else 'pruned'}  {name}")
        if outcome["error"]:
            print(f"  error: {outcome['error']}")
        elif outcome["compacted"]:
            print("  compacted")


def run_from_args(ctx: Context, args) -> int:
    outcomes = run_prune(ctx, args.domains, args.repo, args.dry_run)
    print_json(as_json(outcomes)) if args.json else print_outcomes(outcomes, args.dry_run)
    return exit_code(failed=bool(failures(outcomes)), warned=False)
