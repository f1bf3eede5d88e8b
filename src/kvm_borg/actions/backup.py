"""`kvm-borg backup`: its arguments and its printed summary; the flow is kvm_borg.pipeline.backup."""

from __future__ import annotations

from kvm_borg.actions.common import Context, check_disk_targets, open_repositories, print_json, resolve_domains
from kvm_borg.models import RunSummary
from kvm_borg.pipeline.backup import run_backup


def backup_from_names(ctx: Context, names: list[str], all_domains: bool, repo_names: list[str] | None,
                      cli_excluded: list[str]) -> RunSummary:
    """Given domain names (or --all), --repo names and --exclude-disk targets, back up every domain
    (kvm_borg.pipeline.backup); return the RunSummary. Bad input (unknown domain or repository) raises
    before anything changes."""
    backends = open_repositories(ctx, repo_names)
    domains = resolve_domains(ctx, names, all_domains)
    check_disk_targets(ctx, domains, cli_excluded)
    return run_backup(ctx, domains, backends, cli_excluded)


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
    summary = backup_from_names(ctx, args.domains, args.all, args.repo, args.exclude_disk)
    print_json(summary.as_dict()) if args.json else print_summary(summary)
    return summary.exit_code
