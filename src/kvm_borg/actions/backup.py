"""`kvm-borg backup`: its arguments and its printed summary; the flow is kvm_borg.pipeline.backup."""

from __future__ import annotations

import sys

from kvm_borg import parallel_plan
from kvm_borg.actions.common import Context, check_disk_targets, open_repositories, print_json, resolve_domains
from kvm_borg.errors import UsageError
from kvm_borg.models import RunSummary
from kvm_borg.pipeline.backup import run_backup

MAX_JOBS = 64


def parse_jobs(text: str) -> int:
    """Given `--jobs`'s text, return it as a number of domains at once (1 to MAX_JOBS); anything else is a
    UsageError (one line, exit 2)."""
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_JOBS:
        raise UsageError(f"--jobs {text}: expected a whole number from 1 to {MAX_JOBS}")
    return int(text)


def print_finished(done: int, total: int, result) -> None:
    """Given how many domains are done, how many the run takes and the DomainResult just done, print its
    line to stderr (with jobs > 1 on a terminal, instead of the progress bars)."""
    print(parallel_plan.finished_line(done, total, result), file=sys.stderr, flush=True)


def backup_from_names(ctx: Context, names: list[str], all_domains: bool, repo_names: list[str] | None,
                      cli_excluded: list[str]) -> RunSummary:
    """Given domain names (or --all), --repo names and --exclude-disk targets, back up every domain
    (kvm_borg.pipeline.backup, `ctx.settings.jobs` at once); return the RunSummary. Bad input (unknown
    domain or repository) raises before anything changes. With jobs > 1 no progress bar is drawn (they
    would interleave); on a terminal one line per finished domain goes to stderr instead."""
    settings = ctx.settings
    show_lines = settings.progress and not parallel_plan.shows_progress_bars(settings.jobs, settings.progress)
    settings.progress = parallel_plan.shows_progress_bars(settings.jobs, settings.progress)  # before the backends read it
    backends = open_repositories(ctx, repo_names)
    domains = resolve_domains(ctx, names, all_domains)
    check_disk_targets(ctx, domains, cli_excluded)
    return run_backup(ctx, domains, backends, cli_excluded, print_finished if show_lines else None)


def print_summary(summary: RunSummary) -> None:
    """Print one block per domain: status, archives per repository, warnings."""
    for domain in summary.domains:
        status = "ok" if domain.ok else "FAILED"
        print(f"{domain.domain}: {status} ({domain.consistency or '-'}, {domain.seconds:.1f}s)")
        for store in domain.stores:
            if store.ok:
                print(f"  {store.repository}: {store.archive} ({store.original_size} bytes read, "
                      f"{store.deduplicated_size} bytes added)")
            else:
                print(f"  {store.repository}: FAILED: {store.error}")
        for warning in domain.warnings:
            print(f"  warning: {warning}")
        if domain.error and not domain.stores:
            print(f"  error: {domain.error}")
    for warning in summary.warnings:
        print(f"warning: {warning}")
    for error in summary.errors:
        print(f"error: {error}")


def run_from_args(ctx: Context, args) -> int:
    """Given the Context and the parsed `kvm-borg backup` arguments, back up and print; return the exit code."""
    ctx.settings.full_read = args.full  # `--full`: the bitmap method reads every segment this run
    if args.jobs is not None:
        ctx.settings.jobs = parse_jobs(args.jobs)
    summary = backup_from_names(ctx, args.domains, args.all, args.repo, args.exclude_disk)
    print_json(summary.as_dict()) if args.json else print_summary(summary)
    return summary.exit_code
