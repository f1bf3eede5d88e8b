"""Pure builders of borg 1.4 argv tuples, one per subcommand. Nothing here runs borg.

Every builder takes plain values and does borg's quoting itself: borg 1.4 expands ``{...}``
placeholders in repository locations, archive names, ``--glob-archives`` and ``--comment``, so
braces are doubled on the way in (a JSON comment would otherwise be refused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvm_borg.retention import COUNT_RULES

# An archive name's timestamp: YYYYmmddTHHMMSSZ as shell-glob character classes.
_TIMESTAMP_GLOB = "[0-9]" * 8 + "T" + "[0-9]" * 6 + "Z"
_GLOB_METACHARACTERS = "*?[]"


def escape_placeholders(text: str) -> str:
    """Given text for a borg option that expands placeholders, return it with braces doubled."""
    return text.replace("{", "{{").replace("}", "}}")


def archive_location(repo: str, archive: str | None = None) -> str:
    """Given a repository location and optionally an archive name, return borg's REPO[::ARCHIVE] argument."""
    location = repo if archive is None else f"{repo}::{archive}"
    return escape_placeholders(location)


def archive_glob(domain: str | None) -> str:
    """Given a domain name (None: any), return a shell glob matching only its `{domain}-YYYYmmddTHHMMSSZ` archives.

    Glob metacharacters in the name match literally, and the fixed-width timestamp keeps a
    domain `web` from matching the archives of a domain `web-2`."""
    if domain is None:
        return "*-" + _TIMESTAMP_GLOB
    escaped = "".join(f"[{c}]" if c in _GLOB_METACHARACTERS else c for c in domain)
    return f"{escaped}-{_TIMESTAMP_GLOB}"


def _common_flags(lock_wait: int | None) -> tuple[str, ...]:
    """Given the lock wait (None: borg's default), return the flags every borg run over a repository gets:
    `--log-json` (kvm-borg reads borg's stderr as JSON records) and `--lock-wait`."""
    return ("--log-json",) + (("--lock-wait", str(lock_wait)) if lock_wait is not None else ())


def make_init_command(binary: str, repo: str, encryption: str) -> tuple[str, ...]:
    """Given the borg binary, a repository location and an encryption mode, return the `borg init` argv
    (parent directories are created as needed)."""
    return (binary, "init", "--encryption", encryption, "--make-parent-dirs", "--log-json", archive_location(repo))


def make_create_command(
    binary: str,
    repo: str,
    archive: str,
    paths: Sequence[str],
    *,
    compression: str,
    chunker_params: str,
    read_special: bool,
    sparse: bool,
    plain_files: bool = False,
    comment: str | None,
    progress: bool,
    lock_wait: int | None,
    upload_ratelimit_kib: int | None = None,
) -> tuple[str, ...]:
    """Given a repository, a new archive's name and the absolute paths to store, return the `borg create --json` argv.

    `--sparse` is kept only with a fixed chunker (borg refuses it otherwise), `--read-special`
    only when asked (block devices among the paths), `--noflags --noacls --noxattrs` for `plain_files`
    (a segment view's files carry none: borg then spends no system calls and FUSE requests per file on
    them); the files cache keeps borg's default mode. `upload_ratelimit_kib` (KiB/s, None: no limit) becomes
    `--upload-ratelimit` (borg applies it to ssh repositories only)."""
    fixed_chunker = chunker_params.split(",", 1)[0] == "fixed"
    return (
        (binary, "create", "--json")
        + _common_flags(lock_wait)
        + (("--progress",) if progress else ())
        + (("--upload-ratelimit", str(upload_ratelimit_kib)) if upload_ratelimit_kib else ())
        + ("--compression", compression)
        + ("--chunker-params", chunker_params)
        + (("--sparse",) if sparse and fixed_chunker else ())
        + (("--read-special",) if read_special else ())
        + (("--noflags", "--noacls", "--noxattrs") if plain_files else ())
        + (("--comment", escape_placeholders(comment)) if comment else ())
        + (archive_location(repo, archive),)
        + tuple(paths)
    )


def make_list_command(
    binary: str,
    repo: str,
    *,
    glob: str | None = None,
    last: int | None = None,
    lock_wait: int | None = None,
    format: str | None = None,
) -> tuple[str, ...]:
    """Given a repository and optionally an archive glob and a count, return the `borg list --json` argv of its archives.

    `format` names extra keys for the JSON, e.g. "{comment}"."""
    return (
        (binary, "list", "--json")
        + _common_flags(lock_wait)
        + (("--format", format) if format else ())
        + (("--glob-archives", escape_placeholders(glob)) if glob else ())
        + (("--last", str(last)) if last is not None else ())
        + (archive_location(repo),)
    )


def make_info_command(
    binary: str,
    repo: str,
    *,
    glob: str | None = None,
    lock_wait: int | None = None,
) -> tuple[str, ...]:
    """Given a repository and an archive glob, return the `borg info --json` argv (per-archive stats and comments)."""
    return (
        (binary, "info", "--json")
        + _common_flags(lock_wait)
        + (("--glob-archives", escape_placeholders(glob)) if glob else ())
        + (archive_location(repo),)
    )


def make_list_archive_paths_command(
    binary: str, repo: str, archive: str, *, lock_wait: int | None = None
) -> tuple[str, ...]:
    """Given a repository and an archive name, return the `borg list --json-lines` argv of its items."""
    return (
        (binary, "list", "--json-lines")
        + _common_flags(lock_wait)
        + (archive_location(repo, archive),)
    )


def make_extract_command(
    binary: str,
    repo: str,
    archive: str,
    paths: Sequence[str],
    *,
    sparse: bool = True,
    stdout: bool = False,
    lock_wait: int | None = None,
    plain: bool = False,
) -> tuple[str, ...]:
    """Given an archive and the archive paths to extract, return the `borg extract` argv (into the cwd, or to stdout).

    Each path is passed as a `pf:` pattern, so it names exactly one item and is never read as a
    pattern of another style. `plain`: the archive's metadata beyond the bytes is not applied
    (`--noflags --noacls --noxattrs --numeric-ids`: no immutable flag, ACL or capability from an
    untrusted archive; the caller sets owner and mode itself)."""
    return (
        (binary, "extract")
        + _common_flags(lock_wait)
        + (("--sparse",) if sparse and not stdout else ())
        + (("--stdout",) if stdout else ())
        + (("--noflags", "--noacls", "--noxattrs", "--numeric-ids") if plain else ())
        + (archive_location(repo, archive),)
        + tuple(f"pf:{path}" for path in paths)
    )


def make_export_tar_command(
    binary: str, repo: str, archive: str, path: str, *, lock_wait: int | None = None
) -> tuple[str, ...]:
    """Given an archive and a stored directory, return the `borg export-tar ARCHIVE - pp:PATH` argv: an
    uncompressed tar (no filter for "-") of that directory and everything below it on stdout (members named by their full
    archive paths). The `pp:` pattern names that path and what lies below it, never a sibling like PATH2."""
    return (
        (binary, "export-tar")
        + _common_flags(lock_wait)
        + (archive_location(repo, archive), "-", f"pp:{path}")
    )


def make_export_files_command(
    binary: str, repo: str, archive: str, paths: Sequence[str], *, lock_wait: int | None = None
) -> tuple[str, ...]:
    """Given an archive and stored paths (regular files), return the `borg export-tar ARCHIVE - pf:P...` argv:
    one uncompressed tar of exactly those items on stdout (members named by their archive paths; `pf:`
    names one item each, never what lies below or beside it)."""
    return (
        (binary, "export-tar")
        + _common_flags(lock_wait)
        + (archive_location(repo, archive), "-")
        + tuple(f"pf:{path}" for path in paths)
    )


def make_check_command(
    binary: str,
    repo: str,
    *,
    verify_data: bool = False,
    progress: bool = False,
    lock_wait: int | None = None,
) -> tuple[str, ...]:
    """Given a repository and what to check, return the `borg check` argv."""
    return (
        (binary, "check")
        + _common_flags(lock_wait)
        + (("--progress",) if progress else ())
        + (("--verify-data",) if verify_data else ())
        + (archive_location(repo),)
    )


def make_prune_command(
    binary: str,
    repo: str,
    glob: str,
    keep_flags: Sequence[str],
    *,
    dry_run: bool = False,
    lock_wait: int | None = None,
) -> tuple[str, ...]:
    """Given a repository, the glob of ONE domain's archives and the --keep-* flags, return the `borg prune --list` argv.

    The glob is mandatory: without it borg would apply the policy to every archive in the repository."""
    if not glob:
        raise ValueError("borg prune needs an archive glob")
    return (
        (binary, "prune", "--list")
        + _common_flags(lock_wait)
        + (("--dry-run",) if dry_run else ())
        + ("--glob-archives", escape_placeholders(glob))
        + tuple(keep_flags)
        + (archive_location(repo),)
    )


def make_delete_command(binary: str, repo: str, archive: str, *, lock_wait: int | None = None) -> tuple[str, ...]:
    """Given a repository and one archive name, return the `borg delete` argv of that archive only."""
    return (binary, "delete") + _common_flags(lock_wait) + (archive_location(repo, archive),)


def make_compact_command(
    binary: str, repo: str, *, lock_wait: int | None = None
) -> tuple[str, ...]:
    """Given a repository, return the `borg compact` argv (frees the space of deleted archives)."""
    return (binary, "compact") + _common_flags(lock_wait) + (archive_location(repo),)


def make_mount_command(
    binary: str, repo: str, archive: str, mountpoint: str, *, lock_wait: int | None = None, shared: bool = False
) -> tuple[str, ...]:
    """Given an archive and an empty directory, return the `borg mount -o ro` argv (borg's FUSE process
    goes into the background once the archive is mounted). `shared`: other users (QEMU's) may read every
    file (allow_other, ignore_permissions); the caller keeps the mount point's parent closed to others."""
    options = "ro,allow_other,ignore_permissions" if shared else "ro"
    return (binary, "mount") + _common_flags(lock_wait) + ("-o", options, archive_location(repo, archive),
                                                                       mountpoint)


def make_umount_command(binary: str, mountpoint: str) -> tuple[str, ...]:
    """Given a directory `borg mount` mounted, return the `borg umount` argv."""
    return (binary, "umount", "--log-json", mountpoint)


def make_version_command(binary: str) -> tuple[str, ...]:
    """Given the borg binary, return the argv that prints its version ("borg 1.4.0")."""
    return (binary, "--version")


def make_keep_flags(policy: Mapping[str, Any]) -> tuple[str, ...]:
    """Given a complete retention policy (kvm_borg.retention), return borg prune's --keep-* options."""
    flags: tuple[str, ...] = ()
    if policy.get("keep_within"):
        flags += ("--keep-within", policy["keep_within"])
    for name in COUNT_RULES:
        if policy.get(name):
            flags += ("--" + name.replace("_", "-"), str(policy[name]))
    return flags
