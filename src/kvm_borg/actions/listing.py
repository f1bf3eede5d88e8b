"""`kvm-borg list` and `kvm-borg init`."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime, timezone

from kvm_borg import archive_choice
from kvm_borg.pipeline.archive import host_for
from kvm_borg.actions.common import (
    Context,
    backend_for,
    check_passphrase_file,
    embedded_default_exists,
    ensure_embedded_default,
    print_json,
    usable_repositories,
)
from kvm_borg.config import select_repositories
from kvm_borg.models import ArchiveInfo


log = logging.getLogger(__name__)


def run_list(ctx: Context, domain: str | None, repo_names: list[str] | None,
             host: str | None = None) -> list[ArchiveInfo]:
    """Given an optional domain, --repo names and --host (None: this host; '*': every host), return the
    kvm-borg archives of that host, oldest first; archives dated in the future are listed with a warning."""
    archives: list[ArchiveInfo] = []
    for repo, backend in usable_repositories(ctx, repo_names):
        chosen = host_for(backend, ctx.settings, host, any_allowed=True)
        found = archive_choice.of_host(backend.list_archives(domain), chosen)
        for warning in archive_choice.split_future(found, datetime.now(timezone.utc))[1]:
            log.warning("%s", warning)
        archives.extend(found)
    return sorted(archives, key=lambda a: (a.time, a.repository))


def run_init(ctx: Context, repo_names: list[str] | None) -> list[dict]:
    """Given --repo names (or None for all), create the repositories; return [{repository, created}]."""
    outcomes = []
    for repo in select_repositories(ctx.settings, repo_names):
        check_passphrase_file(repo)
        backend = backend_for(ctx, repo)
        if repo.get("auto_init"):
            existed = embedded_default_exists(repo, backend)
            ensure_embedded_default(ctx, repo, backend)
            outcomes.append({"repository": repo["name"], "created": not existed})
        else:
            outcomes.append({"repository": repo["name"], "created": backend.init()})
    return outcomes


def list_from_args(ctx: Context, args) -> int:
    archives = run_list(ctx, args.domain, args.repo, args.host)
    if args.json:
        print_json([asdict(a) for a in archives])
        return 0
    print(f"{'REPOSITORY':<12} {'ARCHIVE':<48} {'TIME':<26} {'ORIGINAL':>14} {'ADDED':>14}  {'METHOD':<8} DISKS")
    for a in archives:
        print(f"{a.repository:<12} {a.name:<48} {a.time:<26} {a.original_size or 0:>14,d} "
              f"{a.deduplicated_size or 0:>14,d}  {a.method or '?':<8} {','.join(a.disks)}")
    return 0


def init_from_args(ctx: Context, args) -> int:
    for outcome in run_init(ctx, args.repo):
        print(f"{outcome['repository']}: {'created' if outcome['created'] else 'already exists'}")
    return 0
