"""Applying kvm_borg.archive_choice to a repository backend: whose archives, which one.

The decisions are the pure functions of kvm_borg.archive_choice; this module only knows how to
ask a backend (this host's name, restic's host filter, its listing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from kvm_borg import archive_choice
from kvm_borg.errors import UsageError

log = logging.getLogger(__name__)


def this_host(backend, settings) -> str:
    """Given a backend and the Settings, return the host name its archives of this host carry
    (restic: the repository's `host:`, else the config's `hostname`)."""
    return getattr(backend, "host", None) or getattr(settings, "hostname", None) or ""


def host_for(backend, settings, requested: str | None, *, any_allowed: bool = False) -> str:
    """Given a backend, the Settings and --host (None if not given), return the host whose archives are
    taken, and make a restic backend list that host's snapshots. '*' only where `any_allowed`."""
    if requested == archive_choice.ANY_HOST and not any_allowed:
        raise UsageError("--host '*' only lists: restore and verify need one host name")
    configured = (getattr(backend, "repository", None) or {}).get("hosts")
    host = archive_choice.chosen_host(requested, this_host(backend, settings), configured)
    if hasattr(backend, "list_hosts") and (requested is not None or configured is None):
        backend.list_hosts = None if host == archive_choice.ANY_HOST else [host]
    return host


@dataclass
class Chosen:
    """The archive a command takes, the host it was chosen for, and what was skipped on the way."""

    name: str
    host: str
    warnings: list[str] = field(default_factory=list)


def choose(backend, settings, domain: str, archive: str | None, requested_host: str | None,
           now: datetime | None = None) -> Chosen:
    """Given a backend, the Settings, a domain, --archive (None or "latest": the newest) and --host, return
    the Chosen archive: this (or the requested) host's, never one dated in the future as latest."""
    host = host_for(backend, settings, requested_host)
    if archive and archive != "latest":
        listed = [a for a in _every_hosts_archives(backend, domain) if a.name == archive]
        if listed:  # one of kvm-borg's own archives: its comment / restic host must be the chosen host
            archive_choice.check_explicit(listed, archive, domain=domain, host=host, repository=backend.name)
        # any archive (also one made by borgmatic from `kvm-borg freeze`): its meta.json is checked
        # against the host too (check_meta_host)
        return Chosen(archive, host)
    latest, warnings = archive_choice.choose_latest(
        backend.list_archives(domain), domain=domain, host=host, now=now or datetime.now(timezone.utc),
        repository=backend.name)
    for warning in warnings:
        log.warning("%s", warning)
    return Chosen(latest.name, host, warnings)


def _every_hosts_archives(backend, domain: str):
    """Given a backend, return the domain's archives of every host (restic's host filter lifted for this
    one listing), so an explicit archive of another host is refused by name rather than "not found"."""
    if not hasattr(backend, "list_hosts"):
        return backend.list_archives(domain)
    saved, backend.list_hosts = backend.list_hosts, None
    try:
        return backend.list_archives(domain)
    finally:
        backend.list_hosts = saved


def check_meta_host(meta: dict, chosen: Chosen, archive: str) -> None:
    """Given an archive's meta.json and the Chosen host, refuse (UsageError) an archive made on another host."""
    recorded = meta.get("host")
    if isinstance(recorded, str) and recorded and recorded != chosen.host:
        raise UsageError(f"archive {archive!r} was made on host {recorded!r}, not {chosen.host!r}; "
                         f"give --host {recorded} to take it")
