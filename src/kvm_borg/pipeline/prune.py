"""Prune: apply each domain's retention policy in one repository and free the space; record it.

Used by `kvm-borg prune` and by a backup run with `prune_after_backup: true`. Per repository and
domain, only that domain's archives are candidates; archives kvm-borg did not make are never deleted.
"""

from __future__ import annotations

import logging

from kvm_borg import journal, retention, run_record, run_state
from kvm_borg.errors import KvmBorgError
from kvm_borg.models import PruneResult, RunSummary

log = logging.getLogger(__name__)


def prune_repository(settings, repo: dict, backend, domains: list[str] | None, dry_run: bool) -> dict:
    """Given the Settings, one repository, its backend and domain names (None: every domain with kvm-borg
    archives in it), prune each domain with its policy and compact once; return
    {repository, results (PruneResults), error, compacted}."""
    # Imported here: a backup imports this module, and live_restore_plan imports the restore plan's modules.
    from kvm_borg import live_restore_plan

    outcome = {"repository": repo["name"], "results": [], "error": None, "compacted": False}
    readers = live_restore_plan.readers_of(journal.list_entries(settings.journal_dir), repo["name"])
    if readers and not dry_run:  # its archive is being read: prune and compact wait until the pull is done
        reader = readers[0]
        outcome["error"] = (f"refused: the live restore of domain '{reader.domain}' reads archive "
                            f"{reader.extra.get('archive')} from this repository until its pull is done "
                            f"(an interrupted one: 'kvm-borg recover {reader.domain}')")
        log.error("repository %s: %s", repo["name"], outcome["error"])
        return outcome
    try:
        if domains is None:
            domains = sorted({a.domain for a in backend.list_archives(None)})
    except KvmBorgError as exc:
        outcome["error"] = str(exc)
        return outcome
    for domain in domains:
        policy = retention.policy_for(domain, settings.retention, settings.domains_retention)
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


def failures(outcomes: list[dict]) -> list[str]:
    """Given prune outcomes, return one line per failed domain or repository (empty: all pruned)."""
    lines = []
    for outcome in outcomes:
        lines += [f"prune: domain '{r.domain}' in {outcome['repository']}: {r.error}"
                  for r in outcome["results"] if not r.ok]
        if outcome["error"]:
            lines.append(f"prune: repository {outcome['repository']}: {outcome['error']}")
    return lines


def prune_change(outcomes: list[dict]):
    """Given the outcomes of a real (not dry) prune, return the state -> state function that records them
    (per repository: the results, a repository error as a failed result, the archive counts kept)."""

    def change(state: dict) -> dict:
        for outcome in outcomes:
            results = list(outcome["results"])
            if outcome["error"]:
                results.append(PruneResult(outcome["repository"], "", ok=False, error=outcome["error"]))
            counts = {r.domain: sum(1 for rule in r.kept.values() if rule != "checkpoint")
                      for r in outcome["results"] if r.ok}
            run_state.record_prune(state, outcome["repository"], results, counts)
        return state

    return change


def record_prunes(settings, outcomes: list[dict]) -> list[str]:
    """Given the outcomes of a real (not dry) prune, remember them in the run state and rewrite the
    metrics; return the warnings of that (see run_record.update_state)."""
    return run_record.update_state(settings, prune_change(outcomes))


def stored_domains(summary: RunSummary) -> dict[str, list[str]]:
    """Given a backup run's RunSummary, return {repository: [domains that succeeded and were stored there]}."""
    by_repository: dict[str, list[str]] = {}
    for result in summary.domains:
        if result.ok:
            for store in result.stores:
                if store.ok:
                    by_repository.setdefault(store.repository, []).append(result.domain)
    return by_repository


def prune_after_backup(settings, summary: RunSummary, backends) -> list[dict]:
    """Given the Settings, a backup run's RunSummary and its [(repo dict, backend)], prune each domain
    that succeeded in the repositories it was stored in and record that in the run state (the caller
    rewrites the metrics); return the outcomes. A run state that cannot be written raises OSError."""
    by_repository = stored_domains(summary)
    outcomes = [prune_repository(settings, repo, backend, by_repository[repo["name"]], False)
                for repo, backend in backends if repo["name"] in by_repository]
    for outcome in outcomes:
        for result in outcome["results"]:
            if result.ok:
                log.info("pruned domain '%s' in %s: %d kept, %d deleted", result.domain,
                         outcome["repository"], len(result.kept), len(result.pruned))
    if outcomes:
        run_state.update(settings.state_dir, prune_change(outcomes))
    return outcomes
