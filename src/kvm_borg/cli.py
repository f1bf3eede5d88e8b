"""The `kvm-borg` command line: parse arguments, run one action, map the outcome to an exit code.

Each action module in COMMAND_MODULES registers its own subcommand(s) with `add_arguments`
and sets `run(ctx, args) -> exit code` as the parser default.

Exit codes: 0 success, 1 success with warnings, 2 error (bad input, refused, failed), 130 when
interrupted by a signal (after the overlays were merged back).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kvm_borg import __version__
from kvm_borg.errors import Interrupted, KvmBorgError
from kvm_borg.redact import RedactingFilter, RedactingStream, redact_text

COMMAND_MODULES = (
    "kvm_borg.actions.backup",
    "kvm_borg.actions.recover",
    "kvm_borg.actions.listing",
    "kvm_borg.actions.config_cmd",
    "kvm_borg.actions.doctor",
    "kvm_borg.actions.prune",
    "kvm_borg.actions.check",
    "kvm_borg.actions.status",
    "kvm_borg.actions.freeze",
    "kvm_borg.actions.restore",
    "kvm_borg.actions.verify",
    "kvm_borg.actions.mount",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit 2
        self.exit(2, f"kvm-borg: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every action module's subcommands."""
    parser = _Parser(prog="kvm-borg", description="Back up live libvirt domains into Borg or restic.")
    parser.add_argument("--version", action="version", version=f"kvm-borg {__version__}")
    parser.add_argument("-c", "--config", help="config file (default: $KVM_BORG_CONFIG or /etc/kvm-borg/config.yaml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_arguments(subparsers)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="kvm-borg: %(levelname)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # no log line shows a password from a repository URL
        handler.addFilter(RedactingFilter())
    logging.getLogger("sh").setLevel(logging.WARNING)


def _run(args) -> int:
    from kvm_borg.actions.common import make_context
    from kvm_borg.config import load_settings
    from kvm_borg.plugins import bind_settings

    if not getattr(args, "needs_settings", True):
        return args.run(None, args)
    progress = sys.stderr.isatty() and not getattr(args, "no_progress", False) and not getattr(args, "json", False)
    ctx = make_context(load_settings(args.config, progress=progress))
    bind_settings(ctx.pm, ctx.settings)
    try:
        return args.run(ctx, args)
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    stdout = sys.stdout
    sys.stdout = RedactingStream(stdout)  # no output shows a password from a repository URL
    try:
        return _run(args)
    except KvmBorgError as exc:
        print(f"kvm-borg: error: {redact_text(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        done = "overlays were merged back" if args.command in ("backup", "freeze", "thaw") else "cleaned up"
        print(f"kvm-borg: {exc}; {done}", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
