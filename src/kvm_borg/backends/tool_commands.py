"""Pure builders for running a repository's own tool by hand: `kvm-borg borg -- ARGS`,
`kvm-borg restic -- ARGS` and `kvm-borg key export`. Nothing here runs a command.

The environment starts from the one the backend hands borg/restic for its own runs (location,
passphrase, ssh settings); the passthrough only gives back to the user what is a matter of
interactive taste: borg's yes/no questions are asked (not pre-answered "no"), and the user's
own time zone and exit-code style apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvm_borg.backends.borg.commands import archive_location, escape_placeholders
from kvm_borg.backends.restic.commands import global_flags
from kvm_borg.errors import UsageError

# borg variables kvm-borg's own runs fix but a person running borg by hand decides: the questions
# borg asks before a dangerous step, and how times and exit codes look.
BORG_USER_VARIABLES = (
    "BORG_RELOCATED_REPO_ACCESS_IS_OK",
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK",
    "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING",
    "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING",
    "BORG_EXIT_CODES",
    "TZ",
)
# borg commands whose first argument is a subcommand of their own (`borg key export ...`).
BORG_COMMANDS_WITH_SUBCOMMANDS = frozenset({"key", "debug", "benchmark"})
# borg commands that touch no repository: no --lock-wait for them.
BORG_COMMANDS_WITHOUT_REPOSITORY = frozenset({"help", "serve"})


def strip_separator(args: Sequence[str]) -> tuple[str, ...]:
    """Given the arguments after `kvm-borg borg|restic [--repo NAME]`, return them without one leading `--`."""
    args = tuple(args)
    return args[1:] if args[:1] == ("--",) else args


def choose_repository(repositories: Sequence[Mapping[str, Any]], name: str | None, kind: str,
                      command: str) -> Mapping[str, Any]:
    """Given the configured repositories, the --repo NAME (None: not given), the repository type a command
    needs ("borg", "restic") and the command's name for messages, return the repository to use.

    Without --repo: the only repository of that type. A UsageError (one line, exit 2) when NAME is
    unknown, names a repository of another type, or there is none or more than one to choose from."""
    by_name = {repo["name"]: repo for repo in repositories}
    if name is not None:
        repo = by_name.get(name)
        if repo is None:
            raise UsageError(f"--repo {name}: no such repository (configured: {', '.join(by_name) or 'none'})")
        if repo.get("type") != kind:
            other = repo.get("type")
            hint = f"; use `kvm-borg {other} --repo {name} -- ...`" if other in ("borg", "restic") else ""
            raise UsageError(f"--repo {name}: {command} needs a {kind} repository, {name} is a {other} one{hint}")
        return repo
    candidates = [repo for repo in repositories if repo.get("type") == kind]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        configured = ", ".join(f"{repo['name']} ({repo.get('type')})" for repo in repositories) or "none"
        raise UsageError(f"{command}: no {kind} repository is configured (configured: {configured})")
    raise UsageError(f"{command}: several {kind} repositories are configured, choose one with --repo: "
                     f"{', '.join(repo['name'] for repo in candidates)}")


def borg_passthrough_environment(backend_env: Mapping[str, str], location: str,
                                 inherited: Mapping[str, str]) -> dict[str, str]:
    """Given the environment the borg backend uses for its own runs, the repository location and the
    environment kvm-borg was started with, return the environment of `kvm-borg borg -- ARGS`.

    BORG_REPO names the repository (so `list` and `::ARCHIVE` work; braces are doubled because borg
    expands placeholders in it); BORG_USER_VARIABLES are the user's own (inherited or unset)."""
    env = dict(backend_env)
    env["BORG_REPO"] = escape_placeholders(location)
    for key in BORG_USER_VARIABLES:
        if key in inherited:
            env[key] = inherited[key]
        else:
            env.pop(key, None)
    return env


def make_borg_passthrough_command(binary: str, args: Sequence[str], lock_wait: int | None) -> tuple[str, ...]:
    """Given the borg binary, the user's borg arguments and the repository's lock_wait, return the argv.

    `--lock-wait N` goes right after the borg command (and its subcommand, e.g. `key export`), so
    a `--lock-wait` the user gives later wins; nothing is added when the arguments start with an
    option (`--version`) or name a command that opens no repository."""
    args = tuple(args)
    if lock_wait is None or not args or args[0].startswith("-") or args[0] in BORG_COMMANDS_WITHOUT_REPOSITORY:
        return (binary,) + args
    split = 2 if args[0] in BORG_COMMANDS_WITH_SUBCOMMANDS and len(args) > 1 else 1
    return (binary,) + args[:split] + ("--lock-wait", str(lock_wait)) + args[split:]


def make_borg_key_export_command(binary: str, location: str, *, paper: bool,
                                 lock_wait: int | None) -> tuple[str, ...]:
    """Given the borg binary, a repository location and whether to make a paper key, return the
    `borg key export` argv that prints the key to stdout (kvm-borg writes the file itself, 0600)."""
    return (
        (binary, "key", "export", "--log-json")
        + (("--lock-wait", str(lock_wait)) if lock_wait is not None else ())
        + (("--paper",) if paper else ())
        + (archive_location(location), "-")
    )


def make_restic_passthrough_command(binary: str, args: Sequence[str], options: Sequence[str]) -> tuple[str, ...]:
    """Given the restic binary, the user's restic arguments and the repository's extended options (the
    `sftp.command` the backend builds), return the argv; the options go first, as global flags."""
    return (binary,) + global_flags(options) + tuple(args)
