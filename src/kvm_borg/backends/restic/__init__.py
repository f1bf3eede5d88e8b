"""The restic backend: stores each domain's archive in a restic repository through the restic CLI.

A plugin like any other (registered as ``kvm_borg.backends.restic``): `kvm_borg_repository_backend`
answers for repositories of ``type: restic``. The package, one job a module:

- `commands`: pure builders of restic argv tuples, restic's environment, version features;
- `archives`: how one archive maps onto snapshots and tags, and grouping snapshots back into archives;
- `output`: reading `backup --json`, stderr lines and `ls --json`;
- `repository`: `ResticRepository`, the RepositoryBackend that runs restic.
"""

from __future__ import annotations

from kvm_borg.hookspecs import hookimpl


@hookimpl
def kvm_borg_repository_backend(repository, settings):
    """Given a repository config dict and the Settings, return a ResticRepository for `type: restic`, else None."""
    if repository.get("type") != "restic":
        return None
    from kvm_borg.backends.restic.repository import ResticRepository  # late: a run imports only the backends it uses

    return ResticRepository(repository, settings)
