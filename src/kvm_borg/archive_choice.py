"""Which archives a command takes: this host's, and never one dated in the future as "latest".

A repository may hold other hosts' archives (a restic fleet repository, a borg repository an
attacker on another hypervisor or on the backup server can write), and every field of an
archive (its host, its time) is what its writer chose. So:

- `list`, `restore`, `verify` and `status --refresh` take only the archives of ONE host: the
  `--host NAME` given, else (restic) the single host the repository's `hosts:` names, else this
  host (`hostname`, or the restic repository's `host:`). `--host '*'` (list and status only)
  takes every host's.
- "latest" is the newest archive of that host dated at most `CLOCK_SKEW` after now; newer ones
  are skipped with a warning naming them (an archive from the future is a wrong clock or a
  planted one; either way it is not the backup to restore).
- an explicit `--archive NAME` of another host is refused unless `--host` names that host.

Pure functions over ArchiveInfo lists; the caller lists the repository.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from kvm_borg.errors import UsageError
from kvm_borg.models import ArchiveInfo

CLOCK_SKEW = timedelta(minutes=5)
ANY_HOST = "*"


def chosen_host(requested: str | None, this_host: str, configured_hosts: Iterable[str] | None = None) -> str:
    """Given --host (None if not given), this host's name and a restic repository's `hosts:` (None for
    borg or when unset), return the host whose archives are taken (ANY_HOST: every host)."""
    if requested is not None:
        if not requested.strip():
            raise UsageError("--host needs a host name (or '*' for every host)")
        return requested
    configured = [h for h in (configured_hosts or []) if h != ANY_HOST]
    if configured_hosts and len(configured) == 1 and ANY_HOST not in configured_hosts:
        return configured[0]
    return this_host


def of_host(archives: Iterable[ArchiveInfo], host: str) -> list[ArchiveInfo]:
    """Given ArchiveInfos and a host (ANY_HOST: all), return those made on that host, in the given order."""
    return [a for a in archives if host == ANY_HOST or a.host == host]


def archive_time(info: ArchiveInfo) -> datetime | None:
    """Given an ArchiveInfo, return its time as an aware datetime (naive ones are UTC), or None if unreadable."""
    try:
        when = datetime.fromisoformat(info.time)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def split_future(archives: Iterable[ArchiveInfo], now: datetime,
                 skew: timedelta = CLOCK_SKEW) -> tuple[list[ArchiveInfo], list[str]]:
    """Given ArchiveInfos and now (aware), return (those dated at most `skew` after now, warnings naming
    the others: future-dated or with an unreadable time)."""
    kept, warnings = [], []
    for info in archives:
        when = archive_time(info)
        if when is None:
            warnings.append(f"archive {info.name} in {info.repository} has an unreadable time {info.time!r}: "
                            "never taken as latest")
        elif when > now + skew:
            warnings.append(f"archive {info.name} in {info.repository} is dated in the future ({info.time}, "
                            f"host {info.host or 'unknown'}): never taken as latest")
        else:
            kept.append(info)
    return kept, warnings


def choose_latest(archives: Iterable[ArchiveInfo], *, domain: str, host: str, now: datetime,
                  repository: str, skew: timedelta = CLOCK_SKEW) -> tuple[ArchiveInfo, list[str]]:
    """Given a repository's ArchiveInfos of `domain`, the chosen host and now, return (the newest archive of
    that host not dated in the future, warnings about skipped future-dated ones). None left is a UsageError."""
    mine = [a for a in of_host(archives, host) if a.domain == domain]
    eligible, warnings = split_future(mine, now, skew)
    if not eligible:
        others = sorted({a.host or "unknown" for a in archives if a.domain == domain and a not in mine})
        hint = f" (archives of host {', '.join(others)} exist: give --host NAME)" if others else ""
        future = " that is not dated in the future" if mine else ""
        raise UsageError(f"repository {repository!r} has no archive of domain {domain!r} made on host "
                         f"{host!r}{future}{hint}")
    return max(eligible, key=lambda a: (archive_time(a), a.name)), warnings


def check_explicit(archives: Iterable[ArchiveInfo], name: str, *, domain: str, host: str,
                   repository: str) -> ArchiveInfo:
    """Given a repository's ArchiveInfos, an explicit --archive name and the chosen host, return that
    archive; one that does not exist, is another domain's or another host's is a UsageError."""
    found = [a for a in archives if a.name == name]
    if not found:
        raise UsageError(f"repository {repository!r} has no kvm-borg archive {name!r}")
    matching = [a for a in found if a.domain == domain]
    if not matching:
        raise UsageError(f"archive {name!r} holds domain {found[0].domain!r}, not {domain!r}")
    mine = of_host(matching, host)
    if not mine:
        made_on = ", ".join(sorted({a.host or "unknown" for a in matching}))
        raise UsageError(f"archive {name!r} was made on host {made_on}, not {host!r}; "
                         f"give --host {made_on} to take it")
    if len(mine) > 1:
        raise UsageError(f"archive {name!r} exists for several hosts; give --host NAME")
    return mine[0]
