"""`kvm-borg prune`: apply the retention policy to each domain's archives, then free the space.

Per repository and domain, only that domain's archives are candidates (borg: `prune
--glob-archives` with the domain's exact archive glob, then one `compact` per repository;
restic: `forget --tag domain=... --prune`). Archives kvm-borg did not make are never deleted.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from kvm_borg import retention, run_state
from kvm_borg.actions.common import Context, backend_for, check_passphrase_file, print_json
from kvm_borg.config import select_repositories
from kvm_borg.errors import KvmBorgError
from kvm_borg.models import PruneResult

log = logging.getLogger(__name__)


def prune_repository(ctx: Context, repo: dict, backend, domains: list[str] | None, dry_run: bool) -> dict:
    """Given one repository, its backend and domain names (None: every domain with kvm-borg archives in it),
    prune each domain with its policy and compact once; return {repository, results, error}."""
    outcome = {"repository": repo["name"], "results": [], "error": None, "compacted": False}
    try:
        if domains is None:
            domains = sorted({a.domain for a in backend.list_archives(None)})
    except KvmBorgError as exc:
        outcome["error"] = str(exc)
        return outcome
    for domain in domains:
        policy = retention.policy_for(domain, ctx.settings.retention, ctx.settings.domains_retention)
        log.info("%s: pruning domain '%s' in %s (keep %s)%s", "dry run" if dry_run else "prune", domain,
                 repo["name"], retention.describe(policy), "" if not dry_run else ", nothing is deleted")
        try:
            result = backend.prune(domain, policy, dry_run=dry_run)
        except KvmBorgError as exc:
            result = PruneResult(repo["name"], domain, ok=False, dry_run=dry_run, error=str(exc))
        if not result.ok:
            log.error("domain '%s' in %s: prune failed: %s", domain, repo["name"], result.error)
        outcome["results"].append(result)
    if not dry_run and any(r.pruned for r in outcome["results"]):
        try:
            backend.compact()
            outcome["compacted"] = True
        except KvmBorgError as exc:
            outcome["error"] = f"compact failed: {exc}"
            log.error("repository %s: %s", repo["name"], outcome["error"])
    return outcome


def record(ctx: Context, outcomes: list[dict]) -> None:
    """Given the outcomes of a real (not dry) prune run, remember them and rewrite the metrics."""
    from kvm_borg import run_record

    def change(state: dict) -> dict:
        for outcome in outcomes:
            results = list(outcome["results"])
            if outcome["error"]:
                results.append(PruneResult(outcome["repository"], "", ok=False, error=outcome["error"]))
            counts = {r.domain: sum(1 for rule in r.kept.values() if rule != "checkpoint")
                      for r in outcome["results"] if r.ok}
            run_state.record_prune(state, outcome["repository"], results, counts)
        return state

    run_record.update_state(ctx.settings, change)


def run_prune(ctx: Context, domains: list[str], repo_names: list[str] | None, dry_run: bool) -> list[dict]:
    """Given domain names (empty: all with archives), --repo names and --dry-run, prune every chosen repository."""
    outcomes = []
    for repo in select_repositories(ctx.settings, repo_names):
        check_passphrase_file(repo)
        backend = backend_for(ctx, repo)
        if repo.get("auto_init") and not backend.exists():
            continue  # the embedded default repository is created by the first backup
        outcomes.append(prune_repository(ctx, repo, backend, list(domains) or None, dry_run))
    if not dry_run:
        record(ctx, outcomes)
    return outcomes


def prune_after_backup(ctx: Context, summary) -> list[dict]:
    """Given a backup run's RunSummary, prune each domain that succeeded in the repositories it was stored in."""
    by_repository: dict[str, list[str]] = {}
    for result in summary.domains:
        if result.ok:
            for store in result.stores:
                if store.ok:
                    by_repository.setdefault(store.repository, []).append(result.domain)
    outcomes = []
    for repo in select_repositories(ctx.settings, sorted(by_repository) or None):
        if repo["name"] in by_repository:
            outcomes.append(prune_repository(ctx, repo, backend_for(ctx, repo), by_repository[repo["name"]], False))
    if outcomes:
        record(ctx, outcomes)
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


def exit_code(outcomes: list[dict]) -> int:
    failed = any(o["error"] or any(not r.ok for r in o["results"]) for o in outcomes)
    return 2 if failed else 0


def add_arguments(subparsers) -> None:
    """Register `kvm-borg prune`."""
    parser = subparsers.add_parser("prune", help="delete archives the retention policy no longer keeps")
    parser.add_argument("domains", nargs="*", metavar="DOMAIN",
                        help="only these domains (default: every domain with kvm-borg archives)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    parser.add_argument("--repo", action="append", metavar="NAME", help="only this repository (repeatable)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=run_from_args)


def run_from_args(ctx: Context, args) -> int:
    outcomes = run_prune(ctx, args.domains, args.repo, args.dry_run)
    print_json(as_json(outcomes)) if args.json else print_outcomes(outcomes, args.dry_run)
    return exit_code(outcomes)
