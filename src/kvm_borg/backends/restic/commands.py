"""Pure builders of restic argv tuples, restic's environment and version features. Nothing here runs restic.

The repository location never appears in an argv (it goes into RESTIC_REPOSITORY: a `rest:`
URL may hold credentials), nor does a password. Which flags exist depends on the restic
version (`Features`): Debian 12 ships 0.14. How an archive maps onto snapshots and their tags
is `archives`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

_VERSION = re.compile(r"\brestic (\d+)\.(\d+)\.(\d+)")
_TIMESTAMP = re.compile(r"^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$")


# --- versions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What the installed restic can do, by version."""

    version: tuple[int, int, int]

    @property
    def restore_sparse(self) -> bool:
        """`restore --sparse` (0.15+): holes stay holes when restoring."""
        return self.version >= (0, 15, 0)

    @property
    def exit_codes(self) -> bool:
        """Distinct exit codes (0.17+): 10 no repository, 11 locked, 12 wrong password."""
        return self.version >= (0, 17, 0)

    def describe(self) -> str:
        """The version as text, e.g. "0.14.0"."""
        return ".".join(map(str, self.version))


def parse_version(text: str) -> tuple[int, int, int] | None:
    """Given the output of `restic version`, return (major, minor, patch), or None if unreadable."""
    match = _VERSION.search(text)
    return tuple(int(part) for part in match.groups()) if match else None  # type: ignore[return-value]


# --- locations and ssh ------------------------------------------------------------------------


def sftp_target(url: str) -> tuple[str | None, str, int | None] | None:
    """Given a restic repository URL, return (user, host, port) if it is an sftp one, else None.

    Both forms restic takes: `sftp:user@host:/path` and `sftp://user@host:port//path`."""
    if url.startswith("sftp://"):
        parts = urlsplit(url)
        if not parts.hostname:
            return None
        return parts.username, parts.hostname, parts.port
    if url.startswith("sftp:"):
        rest = url[len("sftp:"):]
        user_host, sep, _path = rest.partition(":")
        if not sep or not user_host:
            return None
        user, at, host = user_host.rpartition("@")
        return (user if at else None), host, None
    return None


def sftp_command(url: str, ssh_command: str) -> str | None:
    """Given a repository URL and the ssh command to use, return restic's `sftp.command`, or None if not sftp.

    restic 0.14 has no `sftp.args`: with custom ssh options the whole command must be given, so
    user, host and port come from the URL. `-o BatchMode=yes` goes first, so no configured
    option can make ssh prompt (ssh keeps the first value of an option)."""
    target = sftp_target(url)
    if target is None:
        return None
    user, host, port = target
    argv = shlex.split(ssh_command)
    argv[1:1] = ["-o", "BatchMode=yes"]
    if port is not None:
        argv += ["-p", str(port)]
    argv += [f"{user}@{host}" if user else host, "-s", "sftp"]
    return shlex.join(argv)


# --- time, patterns ---------------------------------------------------------------------------


def restic_time(timestamp: str) -> str:
    """Given a run's UTC timestamp (20261126T121638Z), return it as restic's `--time` (read as UTC: we run with TZ=UTC)."""
    match = _TIMESTAMP.match(timestamp)
    if not match:
        raise ValueError(f"not a kvm-borg timestamp: {timestamp!r}")
    y, mo, d, h, mi, s = match.groups()
    return f"{y}-{mo}-{d} {h}:{mi}:{s}"


def escape_pattern(path: str) -> str:
    """Given a path, return a restic include pattern matching exactly it (glob characters escaped)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", path)


# --- argv builders ----------------------------------------------------------------------------


def global_flags(options: Sequence[str] = (), compression: str | None = None,
                 limit_upload_kib: int | None = None) -> tuple[str, ...]:
    """Given extended options (`sftp.command=...`), a compression mode and an upload limit in KiB/s (None: none),
    return restic's global flags for them."""
    flags: tuple[str, ...] = ()
    for option in options:
        flags += ("--option", option)
    if compression:
        flags += ("--compression", compression)
    if limit_upload_kib:
        flags += ("--limit-upload", str(limit_upload_kib))
    return flags


def make_version_command(binary: str) -> tuple[str, ...]:
    """Given the restic binary, return the argv that prints its version ("restic 0.14.0 compiled with ...")."""
    return (binary, "version")


def make_init_command(binary: str, *, options: Sequence[str] = ()) -> tuple[str, ...]:
    """Given the restic binary and extended options, return the `restic init` argv (repository from the environment)."""
    return (binary, "init") + global_flags(options)


def make_cat_config_command(binary: str, *, options: Sequence[str] = ()) -> tuple[str, ...]:
    """Return the argv that opens the repository and prints its config: does it exist, is the password right."""
    return (binary, "cat", "config") + global_flags(options)


def make_backup_command(
    binary: str,
    paths: Sequence[str],
    *,
    host: str,
    tags: Sequence[str],
    time: str | None,
    compression: str | None = None,
    options: Sequence[str] = (),
    stdin_filename: str | None = None,
    limit_upload_kib: int | None = None,
) -> tuple[str, ...]:
    """Given the paths (or, with `stdin_filename`, the name of the stream on stdin), return the `restic backup --json` argv.

    Tags are passed one `--tag` each (values must be escaped: restic splits them on ",");
    `limit_upload_kib` (KiB/s, None: no limit) becomes `--limit-upload`."""
    if stdin_filename is not None and paths:
        raise ValueError("a stdin backup takes no paths")
    tag_flags: tuple[str, ...] = ()
    for item in tags:
        tag_flags += ("--tag", item)
    return (
        (binary, "backup", "--json")
        + global_flags(options, compression, limit_upload_kib)
        + ("--host", host)
        + tag_flags
        + (("--time", time) if time else ())
        + (("--stdin", "--stdin-filename", stdin_filename) if stdin_filename is not None else ())
        + ((("--",) + tuple(paths)) if paths else ())
    )


def make_snapshots_command(
    binary: str, *, tags: Sequence[str] = (), hosts: Sequence[str] | None = None, options: Sequence[str] = ()
) -> tuple[str, ...]:
    """Given tags that must all be present and the hosts to consider (None: any), return the `restic snapshots --json` argv."""
    return (
        (binary, "snapshots", "--json")
        + global_flags(options)
        + (("--tag", ",".join(tags)) if tags else ())
        + tuple(flag for host in (hosts or ()) for flag in ("--host", host))
    )


def make_ls_command(binary: str, snapshot_id: str, *, options: Sequence[str] = ()) -> tuple[str, ...]:
    """Given a snapshot id, return the `restic ls --json` argv (the snapshot, then one line per node)."""
    return (binary, "ls", "--json") + global_flags(options) + (snapshot_id,)


def make_dump_command(binary: str, snapshot_id: str, path: str, *, options: Sequence[str] = ()) -> tuple[str, ...]:
    """Given a snapshot id and a stored path, return the `restic dump` argv (the file's content on stdout)."""
    return (binary, "dump") + global_flags(options) + ("--", snapshot_id, path)


def make_mount_command(binary: str, mountpoint: str, *, options: Sequence[str] = (),
                       shared: bool = False) -> tuple[str, ...]:
    """Given an empty directory, return the `restic mount` argv (runs in the foreground until unmounted).
    `shared`: other users (QEMU's) may read every file (--allow-other --no-default-permissions); the caller
    keeps the mount point's parent closed to others."""
    share = ("--allow-other", "--no-default-permissions") if shared else ()
    return (binary, "mount") + global_flags(options) + share + ("--", mountpoint)


def make_restore_command(
    binary: str, snapshot_id: str, target: str, include: str, *, sparse: bool, options: Sequence[str] = ()
) -> tuple[str, ...]:
    """Given a snapshot, a target directory and one stored path, return the `restic restore` argv for that path only."""
    return (
        (binary, "restore")
        + global_flags(options)
        + ("--target", target, "--include", escape_pattern(include))
        + (("--sparse",) if sparse else ())
        + (snapshot_id,)
    )


def make_forget_command(binary: str, snapshot_ids: Sequence[str], *, options: Sequence[str] = ()) -> tuple[str, ...]:
    """Given snapshot ids, return the `restic forget` argv that removes them (no prune: data stays until one runs)."""
    return (binary, "forget") + global_flags(options) + ("--",) + tuple(snapshot_ids)


def make_environment(
    inherited: Mapping[str, str],
    *,
    url: str,
    passphrase_file: str | None,
    passphrase_command: str | None,
    progress_fps: float | None = None,
) -> dict[str, str]:
    """Given the inherited environment and a repository's settings, return restic's environment.

    The repository comes from RESTIC_REPOSITORY and the password only from RESTIC_PASSWORD_FILE
    or RESTIC_PASSWORD_COMMAND; inherited variables that would pick another repository, key or
    password are dropped. TZ=UTC makes `--time` and printed times UTC."""
    dropped = {
        "RESTIC_PASSWORD",
        "RESTIC_PASSWORD_FILE",
        "RESTIC_PASSWORD_COMMAND",
        "RESTIC_REPOSITORY",
        "RESTIC_REPOSITORY_FILE",
        "RESTIC_KEY_HINT",
        "RESTIC_HOST",
        "RESTIC_COMPRESSION",
        "RESTIC_PROGRESS_FPS",
    }
    env = {key: value for key, value in inherited.items() if key not in dropped}
    env["RESTIC_REPOSITORY"] = url
    env["TZ"] = "UTC"
    if passphrase_file:
        env["RESTIC_PASSWORD_FILE"] = passphrase_file
    if passphrase_command:
        env["RESTIC_PASSWORD_COMMAND"] = passphrase_command
    if progress_fps:
        env["RESTIC_PROGRESS_FPS"] = str(progress_fps)
    return env


def make_prune_command(binary: str, *, options: Sequence[str] = (), limit_upload_kib: int | None = None
                       ) -> tuple[str, ...]:
    """Return the `restic prune` argv: removes the data no snapshot refers to any more (repacking uploads what
    it keeps, hence `limit_upload_kib`, KiB/s, None: no limit)."""
    return (binary, "prune") + global_flags(options, limit_upload_kib=limit_upload_kib)


def make_check_command(
    binary: str, *, read_data: bool = False, read_data_subset: str | None = None, options: Sequence[str] = ()
) -> tuple[str, ...]:
    """Return the `restic check` argv: the structure; with `read_data` all data, with `read_data_subset` ("10%") a part."""
    if read_data and read_data_subset:
        raise ValueError("give read_data or read_data_subset, not both")
    return (
        (binary, "check")
        + global_flags(options)
        + (("--read-data",) if read_data else ())
        + (("--read-data-subset", read_data_subset) if read_data_subset else ())
    )
