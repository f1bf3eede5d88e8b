"""Reading an archive back, shared by restore, verify and mount: which archive (this host's, through
kvm_borg.archive_choice), its checked meta.json and domain XML, and the bytes of its stored files.

The decisions are the pure functions of kvm_borg.archive_choice and kvm_borg.archive_meta; this
module only asks a RepositoryBackend (this host's name, restic's host filter, its listing, a
stored file's bytes). Everything read is untrusted: only regular files are read, meta.json is
checked whole, sizes of small files are bounded.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone

from kvm_borg import archive_choice, archive_meta, restore_plan
from kvm_borg.errors import UsageError
from kvm_borg.metadata import LIVE_XML_NAME, PERSISTENT_XML_NAME
from kvm_borg.models import RepositoryBackend, read_small_file

log = logging.getLogger(__name__)

MAX_META_BYTES = 16 << 20


# --- which archive -----------------------------------------------------------------------------


def this_host(backend: RepositoryBackend, settings) -> str:
    """Given a backend and the Settings, return the host name its archives of this host carry
    (restic: the repository's `host:`, else the config's `hostname`)."""
    return backend.host or settings.hostname or ""


def host_for(backend: RepositoryBackend, settings, requested: str | None, *, any_allowed: bool = False) -> str:
    """Given a backend, the Settings and --host (None if not given), return the host whose archives are
    taken, and set the backend's `list_hosts` to that host. '*' only where `any_allowed`."""
    if requested == archive_choice.ANY_HOST and not any_allowed:
        raise UsageError("--host '*' only lists: restore and verify need one host name")
    configured = backend.repository.get("hosts")
    host = archive_choice.chosen_host(requested, this_host(backend, settings), configured)
    if requested is not None or configured is None:
        backend.list_hosts = None if host == archive_choice.ANY_HOST else [host]
    return host


@dataclass
class Chosen:
    """The archive a command takes, the host it was chosen for, and what was skipped on the way."""

    name: str
    host: str
    warnings: list[str] = field(default_factory=list)


def choose(backend: RepositoryBackend, settings, domain: str, archive: str | None, requested_host: str | None,
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


def _every_hosts_archives(backend: RepositoryBackend, domain: str):
    """Given a backend, return the domain's archives of every host (its host filter lifted for this
    one listing), so an explicit archive of another host is refused by name rather than "not found"."""
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


# --- what it holds -----------------------------------------------------------------------------


def read_bytes(backend: RepositoryBackend, archive: str, archive_path: str, limit: int = MAX_META_BYTES) -> bytes:
    """Given an archive and a stored path, return the stored file's bytes (a small file: more than `limit`
    bytes is a UsageError)."""
    return read_small_file(backend, archive, archive_path, limit)


def archive_entries(backend: RepositoryBackend, archive: str) -> dict[str, str]:
    """Given an archive, return {stored path without leading "/": kind} (file, dir, symlink, device...,
    "unknown" where the backend cannot tell: restore refuses to read those)."""
    return {str(p).lstrip("/"): kind for p, kind in backend.list_entries(archive).items()}


def read_archive(backend: RepositoryBackend, archive: str, domain: str | None) -> tuple[dict, dict[str, str]]:
    """Given an archive and the domain wanted (None: the only one), return (its meta.json, checked whole,
    {path: kind} of its entries); see read_archive_files."""
    found = read_archive_files(backend, archive, domain)
    return found.meta, found.entries


@dataclass
class ArchiveFiles:
    """What read_archive_files read: the checked meta.json, {path: kind} of the entries, and the bytes of the
    small files read with it ({archive path: bytes}: meta.json candidates and the domain XMLs beside them)."""

    meta: dict
    entries: dict[str, str]
    small: dict[str, bytes] = field(default_factory=dict)


def small_files_wanted(entries: dict[str, str]) -> list[str]:
    """Given {path: kind} of an archive, return the small files read in one go: every meta.json candidate
    that is a regular file, and the domain XMLs listed as regular files beside it (where kvm-borg's
    staging directory puts them)."""
    wanted = []
    for candidate in restore_plan.meta_candidates(sorted(entries)):
        if entries[candidate] != "file":
            continue
        wanted.append(candidate)
        directory = posixpath.dirname(candidate)
        for name in (PERSISTENT_XML_NAME, LIVE_XML_NAME):
            sibling = posixpath.join(directory, name) if directory else name
            if entries.get(sibling) == "file":
                wanted.append(sibling)
    return wanted


def read_archive_files(backend: RepositoryBackend, archive: str, domain: str | None) -> ArchiveFiles:
    """Given an archive and the domain wanted (None: the only one), return its ArchiveFiles: meta.json checked
    whole, the entries, and the small files read in one backend call (`read_files`: borg runs once for
    meta.json and both XMLs).

    meta.json is found by listing: a regular file ending in /meta.json whose JSON carries the
    `kvm_borg` marker. A candidate that is not a regular file, not UTF-8 or not JSON is reported
    when no good one is found; a marked one with a bad key is refused (archive_meta.check_meta)."""
    entries = archive_entries(backend, archive)
    small = backend.read_files(archive, small_files_wanted(entries), MAX_META_BYTES)
    found, problems = [], []
    for candidate in restore_plan.meta_candidates(sorted(entries)):
        if entries[candidate] != "file" or candidate not in small:
            kind = entries[candidate] if entries[candidate] != "file" else "changed file"
            problems.append(f"its meta.json {candidate} is a {kind}, not a regular file; refused")
            continue
        try:
            data = json.loads(small[candidate].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            problems.append(f"its meta.json {candidate} is not valid JSON")
            continue
        if isinstance(data, dict) and "kvm_borg" in data:
            found.append(archive_meta.check_meta(data))
        else:
            problems.append(f"{candidate} is not a kvm-borg meta.json")
    if not found:
        raise UsageError(f"archive {archive}: {problems[0]}" if problems else
                         f"archive {archive} holds no kvm-borg meta.json")
    if domain is not None:  # an archive of `kvm-borg freeze --all` (borgmatic) holds several domains
        names = sorted(m["domain"]["name"] for m in found)
        found = [m for m in found if m["domain"]["name"] == domain]
        if not found:
            raise UsageError(f"archive {archive} holds domain {', '.join(map(repr, names))}, not {domain!r}")
    if len(found) > 1:
        raise UsageError(f"archive {archive} holds {len(found)} kvm-borg meta.json files; refusing to guess")
    return ArchiveFiles(found[0], entries, small)


def read_domain_xml(backend: RepositoryBackend, archive: str, meta: dict, entries: dict[str, str],
                    small: dict[str, bytes] | None = None) -> tuple[str, str]:
    """Given an archive, its checked meta.json and entries (and the small files read with them, if any),
    return (the domain XML's path in the archive, the archived persistent domain XML as text); a missing
    one, one that is not a regular file or not UTF-8 is a UsageError. Read from `small` when it is there,
    else with one more backend call."""
    xml_archive_path = archive_meta.check_archive_path(meta["files"]["domain_xml"], "domain XML")
    if xml_archive_path not in entries:
        raise UsageError(f"archive {archive} lacks the domain XML {xml_archive_path}")
    if entries[xml_archive_path] != "file":
        raise UsageError(f"archive {archive} holds the domain XML {xml_archive_path} as a "
                         f"{entries[xml_archive_path]}, not a regular file; refused")
    try:
        data = (small or {}).get(xml_archive_path)
        if data is None:
            data = read_bytes(backend, archive, xml_archive_path)
        return xml_archive_path, data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"archive {archive}: the domain XML {xml_archive_path} is not UTF-8") from None
