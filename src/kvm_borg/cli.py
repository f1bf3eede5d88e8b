"""The `kvm-borg` command line: parse arguments, run one action, map the outcome to an exit code.

Exit codes: 0 success, 1 success with warnings, 2 error (bad input, refused, failed), 130 when
interrupted by a signal (after the overlays were merged back).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from kvm_borg import __version__
from kvm_borg.errors import Interrupted, KvmBorgError

log = logging.getLogger("kvm_borg")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit 2
        self.exit(2, f"kvm-borg: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = _Parser(prog="kvm-borg", description="Back up live libvirt domains into Borg or restic.")
    parser.add_argument("--version", action="version", version=f"kvm-borg {__version__}")
    parser.add_argument("-c", "--config", help="config file (default: $KVM_BORG_CONFIG or /etc/kvm-borg/config.yaml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    backup = sub.add_parser("backup", help="back up domains")
    backup.add_argument("domains", nargs="*", metavar="DOMAIN")
    backup.add_argument("--all", action="store_true", help="every domain the config's `domains:` selects")
    backup.add_argument("--repo", action="append", metavar="NAME", help="only this repository (repeatable)")
    backup.add_argument("--exclude-disk", action="append", default=[], metavar="TARGET",
                        help="leave this disk target out (repeatable)")
    backup.add_argument("--json", action="store_true", help="print the run summary as JSON")
    backup.add_argument("--no-progress", action="store_true", help="no progress bar even on a TTY")

    recover = sub.add_parser("recover", help="merge back overlays left by interrupted runs")
    recover.add_argument("domains", nargs="*", metavar="DOMAIN")
    recover.add_argument("--all", action="store_true", help="every journal entry (the default)")
    recover.add_argument("--json", action="store_true")

    listing = sub.add_parser("list", help="list archives")
    listing.add_argument("domain", nargs="?", metavar="DOMAIN")
    listing.add_argument("--repo", action="append", metavar="NAME")
    listing.add_argument("--json", action="store_true")

    init = sub.add_parser("init", help="create the configured repositories")
    init.add_argument("--repo", action="append", metavar="NAME")

    config = sub.add_parser("config", help="generate or validate the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    config_sub.add_parser("generate", help="print a commented sample configuration")
    config_sub.add_parser("validate", help="check the configuration file and its plugins")

    doctor = sub.add_parser("doctor", help="check the host, show versions and plugins")
    doctor.add_argument("--round-trip", action="store_true",
                        help="back up a scratch domain into a temporary repository and compare the restore")
    doctor.add_argument("--json", action="store_true")
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="kvm-borg: %(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("sh").setLevel(logging.WARNING)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _print_summary(summary) -> None:
    for domain in summary.domains:
        status = "ok" if domain.ok else "FAILED"
        print(f"{domain.domain}: {status} ({domain.consistency or '-'}, {domain.seconds:.1f}s)")
        for store in domain.stores:
            if store.ok:
                print(f"  {store.repository}: {store.archive} ({store.original_size} bytes read, "
                      f"{store.deduplicated_size} bytes added)")
            else:
                print(f"  {store.repository}: FAILED: {store.error}")
        for warning in domain.warnings:
            print(f"  warning: {warning}")
        if domain.error and not domain.stores:
            print(f"  error: {domain.error}")


def _run(args) -> int:
    from kvm_borg.actions.common import make_context
    from kvm_borg.config import load_settings

    if args.command == "config" and args.config_command == "generate":
        from kvm_borg.actions.config_cmd import sample_config

        sys.stdout.write(sample_config())
        return 0
    progress = sys.stderr.isatty() and not getattr(args, "no_progress", False) and not getattr(args, "json", False)
    settings = load_settings(args.config, progress=progress)
    ctx = make_context(settings)
    try:
        return _dispatch(ctx, args)
    finally:
        ctx.close()


def _dispatch(ctx, args) -> int:
    if args.command == "backup":
        from kvm_borg.actions.backup import run_backup

        summary = run_backup(ctx, args.domains, args.all, args.repo, args.exclude_disk)
        _print_json(summary.as_dict()) if args.json else _print_summary(summary)
        return summary.exit_code
    if args.command == "recover":
        from kvm_borg.actions.recover import run_recover

        outcomes = run_recover(ctx, args.domains)
        if args.json:
            _print_json(outcomes)
        else:
            if not outcomes:
                print("nothing to recover")
            for outcome in outcomes:
                print(f"{outcome['domain']}: {'recovered' if outcome['ok'] else 'FAILED: ' + outcome['error']}")
                for action in outcome["actions"]:
                    print(f"  {action}")
        if any(not o["ok"] for o in outcomes):
            return 2
        return 1 if any(o["warnings"] for o in outcomes) else 0
    if args.command == "list":
        from dataclasses import asdict

        from kvm_borg.actions.listing import run_list

        archives = run_list(ctx, args.domain, args.repo)
        if args.json:
            _print_json([asdict(a) for a in archives])
        else:
            for a in archives:
                size = f"{a.original_size or 0:>14,d} {a.deduplicated_size or 0:>14,d}"
                print(f"{a.repository:<12} {a.name:<48} {a.time:<26} {size}  {','.join(a.disks)}")
        return 0
    if args.command == "init":
        from kvm_borg.actions.listing import run_init

        for outcome in run_init(ctx, args.repo):
            print(f"{outcome['repository']}: {'created' if outcome['created'] else 'already exists'}")
        return 0
    if args.command == "config":
        from kvm_borg.actions.config_cmd import validate_config

        print(validate_config(ctx))
        return 0
    if args.command == "doctor":
        from kvm_borg.actions.doctor import run_doctor

        return run_doctor(ctx, round_trip=args.round_trip, as_json=args.json)
    raise KvmBorgError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return _run(args)
    except KvmBorgError as exc:
        print(f"kvm-borg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"kvm-borg: {exc}; overlays were merged back", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
