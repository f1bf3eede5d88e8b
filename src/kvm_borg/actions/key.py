"""`kvm-borg key export [--repo NAME] [--paper] [--overwrite] FILE`: a borg repository's key, for
safekeeping away from the hypervisor.

borg prints the key (`borg key export [--paper] REPO -`, run with the repository's passphrase and
ssh settings exactly as kvm-borg's own runs); kvm-borg writes it to FILE itself (`atomic`), 0600 from
the first byte, and refuses an existing FILE unless `--overwrite`. FILE `-` is stdout.

restic has no key file: its master key is stored in the repository, encrypted with the password,
so the password is what to keep. Asking for a restic repository's key is refused with one line
saying so (exit 2).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvm_borg import atomic
from kvm_borg.actions.common import Context, open_tool_repository
from kvm_borg.backends.borg.output import BorgLog
from kvm_borg.backends.tool_commands import make_borg_key_export_command
from kvm_borg.errors import KvmBorgError, UsageError
from kvm_borg.execute import CommandError, run_command

log = logging.getLogger(__name__)

# How borg's exports begin: a key file, a paper key.
KEY_FILE_START = "BORG_KEY "
PAPER_KEY_START = "To restore key use borg key import --paper"


def restic_has_no_key(repo: Mapping[str, Any]) -> str:
    """Given a restic repository config, return the one line that says why there is no key to export."""
    secret = repo.get("passphrase_file") or repo.get("passphrase_command") or "its password"
    return (f"repository {repo['name']} is a restic repository: restic has no key file to export (its master key "
            f"is stored in the repository, encrypted with the password); keep a copy of the password "
            f"({secret}) somewhere else instead")


def refuse_restic(repositories: Sequence[Mapping[str, Any]], name: str | None) -> None:
    """Given the configured repositories and --repo NAME (None: not given), raise UsageError with
    `restic_has_no_key` when the key asked for would be a restic repository's."""
    by_name = {repo["name"]: repo for repo in repositories}
    if name is not None:
        chosen = [by_name[name]] if name in by_name else []
    elif not any(repo.get("type") == "borg" for repo in repositories):
        chosen = list(repositories)
    else:
        chosen = []
    restic = [repo for repo in chosen if repo.get("type") == "restic"]
    if len(restic) == 1:
        raise UsageError(restic_has_no_key(restic[0]))


def check_destination(file: str, overwrite: bool) -> Path | None:
    """Given FILE and --overwrite, return the absolute path to write (None for `-`, stdout); a FILE that
    exists (without --overwrite), is a directory, or whose directory is missing is a UsageError."""
    if file == "-":
        return None
    path = Path(os.path.abspath(file))
    if path.is_dir():
        raise UsageError(f"{file} is a directory: name the file to write the key to")
    if os.path.lexists(path) and not overwrite:
        raise UsageError(f"{file} exists: choose another file, or use --overwrite to replace it")
    if not path.parent.is_dir():
        raise UsageError(f"{file}: directory {path.parent} does not exist")
    return path


def check_export(text: str, paper: bool) -> None:
    """Given what `borg key export` printed, raise KvmBorgError unless it looks like the export asked for."""
    start = PAPER_KEY_START if paper else KEY_FILE_START
    if not text.startswith(start):
        raise KvmBorgError(f"borg key export printed no {'paper key' if paper else 'key file'}")


def write_private_file(path: Path, data: bytes, overwrite: bool) -> None:
    """Given an absolute path, bytes and --overwrite, write the file mode 0600 (from its creation, whatever
    the umask; a symlink at `path` is never followed): created exclusively (an existing file is a
    UsageError), or with `overwrite` replaced atomically through a temporary file beside it."""
    if overwrite:
        atomic.write_atomic(path, data, 0o600)
        return
    try:
        atomic.create_exclusive(path, data, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: choose another file, or use --overwrite to replace it") from None


def export_key(backend, paper: bool) -> str:
    """Given a borg backend, run `borg key export [--paper] REPO -` and return what it printed."""
    argv = make_borg_key_export_command(backend.binary, backend.location, paper=paper, lock_wait=backend.lock_wait)
    borg_log = BorgLog()
    try:
        result = run_command(argv, on_stderr_line=borg_log.feed, **backend.command_environment())
    except CommandError as exc:
        raise KvmBorgError(f"repository {backend.name!r}: {exc.message}") from None
    if result.returncode not in (0, 1):  # 1: borg warned, the key was still printed
        raise KvmBorgError(f"repository {backend.name!r}: borg key export failed: "
                           f"{borg_log.error_message(result.returncode)}")
    check_export(result.stdout, paper)
    return result.stdout


def run_key_export(ctx: Context, args) -> int:
    """Run `kvm-borg key export`; return 0 (errors are raised)."""
    refuse_restic(ctx.settings.repositories, args.repo)
    destination = check_destination(args.file, args.overwrite)
    repo, backend = open_tool_repository(ctx, args.repo, "borg", "key export")
    text = export_key(backend, args.paper)
    if destination is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    write_private_file(destination, text.encode(), args.overwrite)
    secret = repo.get("passphrase_file") or repo.get("passphrase_command") or "its passphrase"
    print(f"kvm-borg: wrote the {'paper ' if args.paper else ''}key of borg repository {repo['name']} "
          f"({repo['path']}) to {destination} (mode 0600); keep it, and the passphrase ({secret}), "
          f"somewhere other than this host", file=sys.stderr)
    return 0

