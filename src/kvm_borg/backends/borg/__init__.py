"""The borg backend: stores each domain's archive in a borg 1.4 repository through the borg CLI.

A plugin like any other (registered as ``kvm_borg.backends.borg``): `kvm_borg_repository_backend`
answers for repositories of ``type: borg``. The package, one job a module:

- `defaults`: the borg defaults (encryption, compression, chunker, lock wait);
- `specs`: borg's `--compression` / `--chunker-params` syntax, checked at config load;
- `commands`: pure builders of borg argv tuples;
- `environment`: which borg binary, and the environment a borg run gets;
- `output`: reading borg's JSON, its ``--log-json`` stderr records and `prune --list` lines;
- `repository`: `BorgRepository`, the RepositoryBackend that runs borg.
"""

from __future__ import annotations

from kvm_borg.hookspecs import hookimpl


@hookimpl
def kvm_borg_repository_backend(repository, settings):
    """Given a repository config dict and the Settings, return a BorgRepository for `type: borg`, else None."""
    if repository.get("type") != "borg":
        return None
    from kvm_borg.backends.borg.repository import BorgRepository  # late: a run imports only the backends it uses

    return BorgRepository(repository, settings)
