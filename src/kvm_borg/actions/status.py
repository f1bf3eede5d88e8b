"""`kvm-borg status`: per domain and repository the last successful backup, its age, the archive
count and the last size; exit code 2 when a domain's newest backup is older than `max_age`.

It reads the run state kept by kvm-borg (kvm_borg.run_state) and opens no repository, so it
answers at once even while a backup holds a repository's lock: usable as a Nagios/Icinga check
(0 OK, 1 WARNING: the last attempt failed but a recent backup exists, 2 CRITICAL: stale or never
backed up). `--refresh` first lists the repositories and records what they hold: only the archives
of this host (or `--host NAME`), and an archive dated in the future never counts as the last backup.
`--all-hosts` lists the repositories instead and reports every host's domains found in them (a
fleet writing into one restic repository; borg: one repository per host, each in the config).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from kvm_borg import archive_choice, run_record, run_state
from kvm_borg.pipeline.archive import host_for
from kvm_borg.actions.common import Context, print_json, resolve_domains, usable_repositories
from kvm_borg.config import select_repositories
from kvm_borg.config_formats import parse_duration
from kvm_borg.errors import ConfigError, UsageError


def format_age(seconds: float | None) -> str:
    """Given an age in seconds (None: never), return it short, e.g. '3d4h', '26h0m', '5m', 'never'."""
    if seconds is None:
        return "never"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m"


def domain_rows(state: dict, domains: list[str], repositories: list[str], max_age: float, now: float) -> list[dict]:
    """Given the run state, the domains and repositories to report and max_age, return one row per pair.

    A row is stale when the pair has no successful backup or its newest is older than max_age."""
    rows = []
    for domain in domains:
        entry = state["domains"].get(domain, {})
        for repository in repositories:
            data = entry.get("repositories", {}).get(repository, {})
            success = data.get("last_success") or {}
            attempt = data.get("last_attempt") or {}
            age = now - success["time"] if success.get("time") else None
            rows.append({
                "domain": domain,
                "repository": repository,
                "last_success": success.get("time"),
                "age_seconds": age,
                "archive": success.get("archive"),
                "archive_count": data.get("archive_count"),
                "last_size": success.get("original_size"),
                "last_added": success.get("deduplicated_size"),
                "last_attempt": attempt.get("time"),
                "last_attempt_ok": attempt.get("ok"),
                "last_error": attempt.get("error"),
                "stale": age is None or age > max_age,
            })
    return rows


def fleet_rows(archives: list, max_age: float, now: float) -> list[dict]:
    """Given ArchiveInfos of any hosts and repositories (none dated in the future) and max_age, return one
    row per (host, domain, repository) with its newest archive, sorted; stale when older than max_age."""
    newest: dict[tuple, list] = {}
    for archive in archives:
        when = archive_choice.archive_time(archive)
        if when is None:
            continue
        key = (archive.host or "", archive.domain, archive.repository)
        newest.setdefault(key, []).append((when.timestamp(), archive))
    rows = []
    for (host, domain, repository), found in sorted(newest.items()):
        when, archive = max(found, key=lambda pair: pair[0])
        age = now - when
        rows.append({
            "host": host, "domain": domain, "repository": repository, "last_success": when,
            "age_seconds": age, "archive": archive.name, "archive_count": len(found),
            "last_size": archive.original_size, "last_added": archive.deduplicated_size,
            "last_attempt": None, "last_attempt_ok": None, "last_error": None, "stale": age > max_age,
        })
    return rows


def verdict(rows: list[dict]) -> int:
    """Given status rows, return the exit code: 2 if any is stale, 1 if any last attempt failed, else 0."""
    if any(row["stale"] for row in rows):
        return 2
    if any(row["last_attempt_ok"] is False for row in rows):
        return 1
    return 0


log = logging.getLogger(__name__)


def refresh(ctx: Context, repo_names: list[str] | None, host: str | None = None) -> None:
    """Given --repo names (None: all), list those repositories and record the archives of this host (or `host`; '*': every host) per
    domain in the run state, leaving out archives dated in the future (with a warning)."""
    found: dict[str, dict[str, list]] = {}
    for repo, backend in usable_repositories(ctx, repo_names):
        per_domain = found.setdefault(repo["name"], {})
        chosen = host_for(backend, ctx.settings, host, any_allowed=True)
        archives = archive_choice.of_host(backend.list_archives(None), chosen)
        archives, warnings = archive_choice.split_future(archives, datetime.now(timezone.utc))
        for warning in warnings:
            log.warning("%s", warning)
        for archive in archives:
            per_domain.setdefault(archive.domain, []).append(archive)

    def change(state: dict) -> dict:
        for repository, per_domain in found.items():
            for domain in set(per_domain) | set(state["domains"]):
                if repository in state["domains"].get(domain, {}).get("repositories", {}) or domain in per_domain:
                    archives = sorted(per_domain.get(domain, []), key=lambda a: a.time)
                    run_state.record_archives(state, repository, domain, archives)
        return state

    run_record.update_state(ctx.settings, change)


def all_hosts(ctx: Context, names: list[str], repo_names: list[str] | None, max_age: float) -> list[dict]:
    """Given domain names (empty: every domain found), --repo names and max_age, list those repositories
    and return the fleet rows of every host's archives (archives dated in the future left out, warned)."""
    archives = []
    for repo, backend in usable_repositories(ctx, repo_names):
        host_for(backend, ctx.settings, archive_choice.ANY_HOST, any_allowed=True)
        found, warnings = archive_choice.split_future(backend.list_archives(None), datetime.now(timezone.utc))
        for warning in warnings:
            log.warning("%s", warning)
        archives += [a for a in found if not names or a.domain in names]
    rows = fleet_rows(archives, max_age, time.time())
    missing = [name for name in names if name not in {row["domain"] for row in rows}]
    return rows + [{"host": None, "domain": name, "repository": None, "last_success": None, "age_seconds": None,
                    "archive": None, "archive_count": 0, "last_size": None, "last_added": None, "last_attempt": None,
                    "last_attempt_ok": None, "last_error": None, "stale": True} for name in missing]


def run_status(ctx: Context, names: list[str], repo_names: list[str] | None, max_age: float,
               refresh_first: bool, host: str | None = None) -> list[dict]:
    """Given domain names (empty: those `--all` selects), --repo names, max_age, --refresh and its --host,
    return the status rows."""
    repositories = select_repositories(ctx.settings, repo_names)
    if host is not None and not refresh_first:
        raise UsageError("--host chooses whose archives --refresh records: give --refresh too")
    if refresh_first:
        refresh(ctx, repo_names, host)
    domains = resolve_domains(ctx, [], True, allow_empty=True) if not names else list(dict.fromkeys(names))
    state = run_state.load(ctx.settings.state_dir)
    return domain_rows(state, domains, [r["name"] for r in repositories], max_age, time.time())


def run_from_args(ctx: Context, args) -> int:
    try:
        max_age = parse_duration(args.max_age, "--max-age") if args.max_age else ctx.settings.max_age
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.all_hosts:
        if args.refresh or args.host is not None:
            raise UsageError("--all-hosts lists the repositories itself: it takes no --refresh or --host")
        rows = all_hosts(ctx, list(dict.fromkeys(args.domains)), args.repo, max_age)
    else:
        rows = run_status(ctx, args.domains, args.repo, max_age, args.refresh, args.host)
    code = verdict(rows) if rows or not args.all_hosts else 2  # a fleet with no archive at all is not OK
    if args.json:
        print_json({"exit_code": code, "max_age_seconds": max_age, "domains": rows})
        return code
    if args.all_hosts:
        print_fleet(rows, max_age, code)
        return code
    stale = [row for row in rows if row["stale"]]
    failed = [row for row in rows if row["last_attempt_ok"] is False]
    if stale:
        worst = ", ".join(f"{r['domain']} in {r['repository']} ({format_age(r['age_seconds'])})" for r in stale)
        print(f"CRITICAL: no backup within {format_age(max_age)}: {worst}")
    elif failed:
        print("WARNING: last attempt failed: " + ", ".join(f"{r['domain']} in {r['repository']}" for r in failed))
    else:
        print(f"OK: {len({r['domain'] for r in rows})} domains backed up within {format_age(max_age)}")
    print(f"{'DOMAIN':<24} {'REPOSITORY':<12} {'AGE':>8} {'ARCHIVES':>8} {'LAST SIZE':>14}  LAST ARCHIVE")
    for row in rows:
        count = "-" if row["archive_count"] is None else str(row["archive_count"])
        size = "-" if row["last_size"] is None else f"{row['last_size']:,d}"
        note = f"  (last attempt failed: {row['last_error']})" if row["last_attempt_ok"] is False else ""
        print(f"{row['domain']:<24} {row['repository']:<12} {format_age(row['age_seconds']):>8} {count:>8} "
              f"{size:>14}  {row['archive'] or '-'}{note}")
    return code


def print_fleet(rows: list[dict], max_age: float, code: int) -> None:
    """Given the fleet rows, max_age and the exit code, print the verdict line and one line per row."""
    if not rows:
        print("CRITICAL: no archive of any host in the repositories")
    elif code == 2:
        print(f"CRITICAL: no backup within {format_age(max_age)}: " + ", ".join(
            f"{r['domain']} of {r['host'] or 'no host'} in {r['repository'] or 'no repository'} "
            f"({format_age(r['age_seconds'])})" for r in rows if r["stale"]))
    else:
        print(f"OK: {len({r['host'] for r in rows})} hosts, {len({(r['host'], r['domain']) for r in rows})} "
              f"domains backed up within {format_age(max_age)}")
    print(f"{'HOST':<16} {'DOMAIN':<24} {'REPOSITORY':<12} {'AGE':>8} {'ARCHIVES':>8} {'LAST SIZE':>14}  LAST ARCHIVE")
    for row in rows:
        size = "-" if row["last_size"] is None else f"{row['last_size']:,d}"
        print(f"{row['host'] or '-':<16} {row['domain']:<24} {row['repository'] or '-':<12} "
              f"{format_age(row['age_seconds']):>8} {row['archive_count']:>8} {size:>14}  {row['archive'] or '-'}")
