"""What every command needs: the plugin manager, repository backends, the embedded default's
first-use set-up, passphrase-file checks and domain selection."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from kvm_borg.atomic import create_exclusive
from kvm_borg.config import Settings, select_repositories
from kvm_borg.engine import lifecycle
from kvm_borg.engine.connection import Connection
from kvm_borg.engine.domain_xml import disk_targets, domain_selected
from kvm_borg.errors import ConfigError, KvmBorgError, UsageError
from kvm_borg.models import RepositoryBackend
from kvm_borg.plugins import make_plugin_manager
from kvm_borg.pipeline.backup import prepare_state_dir
from kvm_borg.redact import redact_text

log = logging.getLogger(__name__)

NOTICE_MARKER = ".first-use-notice-shown"


@dataclass
class Context:
    """One command's world: settings, plugins, and (lazily) the libvirt connection."""

    settings: Settings
    pm: object
    _connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = Connection(self.settings.libvirt_uri)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


def make_context(settings: Settings) -> Context:
    """Given Settings, return a Context with every plugin loaded."""
    return Context(settings, make_plugin_manager(settings.plugins))


def check_passphrase_file(repo: dict) -> None:
    """Refuse a passphrase file that is missing or readable by group/others (exit 2)."""
    path = repo.get("passphrase_file")
    if not path or repo.get("auto_init"):
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"repository {repo['name']}: passphrase_file {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"repository {repo['name']}: passphrase_file {path} is accessible by others "
            f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
        )


def backend_for(ctx: Context, repo: dict) -> RepositoryBackend:
    """Given a repository dict, return the backend a plugin offers for its type (ConfigError if none)."""
    backend = ctx.pm.hook.kvm_borg_repository_backend(repository=repo, settings=ctx.settings)
    if backend is None:
        raise ConfigError(f"repository {repo['name']}: no plugin handles repository type {repo['type']!r}")
    return backend


def embedded_default_exists(repo: dict, backend: RepositoryBackend) -> bool:
    """Given the zero-config repository, return whether the first backup (or `kvm-borg init`) created it:
    its generated passphrase file and the repository are there (before that, neither is, and the
    repository cannot be asked without the passphrase)."""
    return os.path.lexists(repo["passphrase_file"]) and backend.exists()


def ensure_embedded_default(ctx: Context, repo: dict, backend: RepositoryBackend) -> None:
    """For the zero-config repository: generate the passphrase (0600) and create the repository on
    first use, and tell the user once to export the key and keep the passphrase."""
    if not repo.get("auto_init"):
        return
    prepare_state_dir(ctx.settings)
    passphrase = Path(repo["passphrase_file"])
    if not os.path.lexists(passphrase):
        import secrets  # only the first use pays its import (hashlib, random): not every backup's start-up

        create_exclusive(passphrase, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    if backend.init():
        marker = ctx.settings.state_dir / NOTICE_MARKER
        if not marker.exists():
            print(
                f"kvm-borg: created the encrypted borg repository {repo['path']} with a generated passphrase "
                f"in {passphrase} (root only). Keep a copy of both somewhere else: without them the backups "
                f"cannot be read. Export the key with: kvm-borg key export --repo {repo['name']} --paper "
                f"/root/kvm-borg-key.txt",
                file=sys.stderr,
            )
            if not os.path.lexists(marker):
                create_exclusive(marker, b"", 0o600)


def open_repository(ctx: Context, name: str | None) -> tuple[dict, RepositoryBackend]:
    """Given --repo NAME (None: the first configured repository), return (repo dict, backend) to read from,
    its passphrase file checked (no preflight, nothing created)."""
    repo = select_repositories(ctx.settings, [name] if name else None)[0]
    check_passphrase_file(repo)
    return repo, backend_for(ctx, repo)


def open_repositories(ctx: Context, names: list[str] | None) -> list[tuple[dict, RepositoryBackend]]:
    """Given --repo names (or None), return [(repo dict, backend)], checking passphrase files, each backend's
    preflight passed and the embedded default repository created on first use."""
    chosen = select_repositories(ctx.settings, names)
    result = []
    for repo in chosen:
        check_passphrase_file(repo)
        backend = backend_for(ctx, repo)
        backend.preflight()
        ensure_embedded_default(ctx, repo, backend)
        result.append((repo, backend))
    return result


def open_tool_repository(ctx: Context, name: str | None, kind: str, command: str) -> tuple[dict, RepositoryBackend]:
    """Given --repo NAME (None: the only one of its type), the type a command needs and the command's
    name, return (repository dict, backend), its passphrase file checked (UsageError on bad input).

    The backend's `command_environment` says what a run gets (a backend that cannot run its tool by
    hand raises a UsageError there, see models.BackendBase); argv is built from the built-in borg
    and restic backends' `binary` (and borg's `lock_wait`, restic's `options`)."""
    from kvm_borg.backends.tool_commands import choose_repository  # not on a backup's path (start-up time)

    repo = choose_repository(ctx.settings.repositories, name, kind, command)
    [(repo, backend)] = open_repositories(ctx, [repo["name"]])
    return repo, backend
def usable_repositories(ctx: Context, names: list[str] | None) -> list[tuple[dict, object]]:
    """Given --repo names (or None), return [(repo dict, backend)] of the chosen repositories that can be
    read, checking passphrase files; the embedded default repository is left out until the first backup
    created it."""
    usable = []
    for repo in select_repositories(ctx.settings, names):
        check_passphrase_file(repo)
        backend = backend_for(ctx, repo)
        if repo.get("auto_init") and not embedded_default_exists(repo, backend):
            continue
        usable.append((repo, backend))
    return usable


def no_domain_matches(include: list[str], exclude: list[str], on_host: int) -> str:
    """Given the config's domains.include/exclude and how many domains the host has, return the one
    line that says `--all` selected nothing."""
    return (f"--all: no domain matches domains.include/exclude (include: {', '.join(include) or 'none'}; "
            f"exclude: {', '.join(exclude) or 'none'}; {on_host} domains on this host)")


def resolve_domains(ctx: Context, names: list[str], all_domains: bool, *, allow_empty: bool = False) -> list[str]:
    """Given domain names or --all, return the names to work on; an unknown name is a UsageError, and
    so is an --all that selects nothing (a run that backs up nothing must not look green) unless
    `allow_empty`."""
    conn = ctx.connection
    if all_domains:
        include = ctx.settings.domains["include"]
        exclude = ctx.settings.domains["exclude"]
        on_host = lifecycle.domain_names(conn.conn)
        chosen = sorted(name for name in on_host if domain_selected(name, include, exclude))
        if not chosen and not allow_empty:
            raise UsageError(no_domain_matches(include, exclude, len(on_host)))
        return chosen
    if not names:
        raise UsageError("name at least one domain, or use --all")
    for name in names:
        try:
            conn.lookup(name)
        except KvmBorgError as exc:
            raise UsageError(str(exc)) from None
    return list(dict.fromkeys(names))


def check_disk_targets(ctx: Context, domains: list[str], targets: list[str]) -> None:
    """Refuse (UsageError) a --exclude-disk/--disk target that is a disk of none of `domains`."""
    if not targets:
        return
    known: set[str] = set()
    for name in domains:
        known.update(disk_targets(lifecycle.live_xml(ctx.connection.lookup(name))))
    for target in targets:
        if target not in known:
            where = f"domain '{domains[0]}'" if len(domains) == 1 else "any of the selected domains"
            raise UsageError(f"disk {target} is not a disk of {where} (disks: {', '.join(sorted(known))})")


def print_json(data) -> None:
    """Print `data` as indented JSON (dataclasses already turned into dicts)."""
    print(redact_text(json.dumps(data, indent=2, ensure_ascii=False, default=str)))
