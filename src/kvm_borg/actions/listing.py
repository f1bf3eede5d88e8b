"""`kvm-borg list` and `kvm-borg init`."""

from __future__ import annotations

from kvm_borg.actions.common import Context, check_passphrase_file, backend_for, ensure_embedded_default
from kvm_borg.config import select_repositories
from kvm_borg.models import ArchiveInfo


def run_list(ctx: Context, domain: str | None, repo_names: list[str] | None) -> list[ArchiveInfo]:
    """Given an optional domain and --repo names, return the kvm-borg archives, oldest first."""
    archives: list[ArchiveInfo] = []
    for repo in select_repositories(ctx.settings, repo_names):
        check_passphrase_file(repo)
        backend = backend_for(ctx, repo)
        if repo.get("auto_init") and not backend.exists():
            continue  # the embedded default repository is created by the first backup
        archives.extend(backend.list_archives(domain))
    return sorted(archives, key=lambda a: (a.time, a.repository))


def run_init(ctx: Context, repo_names: list[str] | None) -> list[dict]:
    """Given --repo names (or None for all), create the repositories; return [{repository, created}]."""
    outcomes = []
    for repo in select_repositories(ctx.settings, repo_names):
        check_passphrase_file(repo)
        backend = backend_for(ctx, repo)
        if repo.get("auto_init"):
            existed = backend.exists()
            ensure_embedded_default(ctx, repo, backend)
            outcomes.append({"repository": repo["name"], "created": not existed})
        else:
            outcomes.append({"repository": repo["name"], "created": backend.init()})
    return outcomes
