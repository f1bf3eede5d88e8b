"""`kvm-borg borg --repo NAME -- ARGS...` and `kvm-borg restic --repo NAME -- ARGS...`: run the
configured borg/restic by hand on a configured repository, the way `borgmatic borg` does.

The tool gets the repository's location (borg: BORG_REPO, so `list` and `::ARCHIVE` work; restic:
RESTIC_REPOSITORY), its passphrase exactly as kvm-borg's own runs hand it over (never in argv or
the log), its ssh settings and (borg) its lock_wait. stdin, stdout, stderr and the terminal are
the user's; the tool's exit code is kvm-borg's.
"""

from __future__ import annotations

import logging
import os
import signal

from kvm_borg.actions.common import Context, open_tool_repository
from kvm_borg.backends.tool_commands import (
    borg_passthrough_environment,
    make_borg_passthrough_command,
    make_restic_passthrough_command,
    strip_separator,
)
from kvm_borg.errors import KvmBorgError, UsageError
from kvm_borg.execute import CommandError, run_attached

log = logging.getLogger(__name__)


def _tool_args(args, kind: str, example: str) -> tuple[str, ...]:
    tool_args = strip_separator(args.args)
    if not tool_args:
        raise UsageError(f"name the {kind} command to run, e.g. `kvm-borg {kind} --repo NAME -- {example}`")
    return tool_args


def run_borg(ctx: Context, args) -> int:
    """Run `kvm-borg borg`; return borg's exit status."""
    tool_args = _tool_args(args, "borg", "list")
    repo, backend = open_tool_repository(ctx, args.repo, "borg", "kvm-borg borg")
    options = backend.command_environment()
    env = borg_passthrough_environment(options["env"], backend.location, os.environ)
    argv = make_borg_passthrough_command(backend.binary, tool_args, backend.lock_wait)
    return _run(repo, argv, env=env, secret=options["secret"], secret_env=options["secret_env"])


def run_restic(ctx: Context, args) -> int:
    """Run `kvm-borg restic`; return restic's exit status."""
    tool_args = _tool_args(args, "restic", "snapshots")
    repo, backend = open_tool_repository(ctx, args.repo, "restic", "kvm-borg restic")
    argv = make_restic_passthrough_command(backend.binary, tool_args, backend.options)
    return _run(repo, argv, **backend.command_environment(), stop_signal=signal.SIGINT)


def _run(repo: dict, argv, **kwargs) -> int:
    try:
        return run_attached(argv, **kwargs)
    except CommandError as exc:
        raise KvmBorgError(f"repository {repo['name']!r}: {exc.message}") from None

