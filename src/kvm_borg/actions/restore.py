"""`kvm-borg restore`: the command line of kvm_borg.pipeline.restore (options in, result printed)."""

from __future__ import annotations

import logging
import sys

from kvm_borg import signals
from kvm_borg.actions.common import Context, open_repository, print_json
from kvm_borg.errors import KvmBorgError, UsageError
from kvm_borg.pipeline.restore import RestoreOptions, check_options, run_restore

log = logging.getLogger(__name__)


# --- the command -------------------------------------------------------------------------------


def restore(ctx: Context, options: RestoreOptions):
    """Given the Context and RestoreOptions, check the options, open the repository and restore; return the
    RestoreResult."""
    check_options(options)
    repo, backend = open_repository(ctx, options.repo)
    return run_restore(ctx.settings, ctx.connection.conn, repo, backend, options)


def live_restore(ctx: Context, options: RestoreOptions, bandwidth: int, on_started):
    """Given the Context, RestoreOptions, the pull bandwidth per disk (bytes/s, 0: unlimited) and a callback for
    the moment the domain runs, restore the domain live (kvm_borg.pipeline.live_restore); return the result."""
    from kvm_borg.pipeline.live_restore import check_live_options, run_live_restore

    check_options(options)
    check_live_options(options)
    repo, backend = open_repository(ctx, options.repo)
    return run_live_restore(ctx.settings, ctx.connection.conn, repo, backend, options, bandwidth=bandwidth,
                            on_started=on_started)


def run_live_from_args(ctx: Context, args) -> int:
    if args.define or args.start:
        raise UsageError("--live defines and starts the domain itself: it takes no --define or --start")
    if args.pull_bandwidth < 0:
        raise UsageError("--pull-bandwidth must be 0 (unlimited) or more MiB/s")
    options = RestoreOptions(domain=args.domain, archive=args.archive, repo=args.repo, target_dir=args.target_dir,
                             name=args.name, disks=args.disk, to=args.to, overwrite=args.overwrite, host=args.host)

    def on_started(result) -> None:
        line = (f"{result.domain}: running after {result.running_after_seconds:.1f}s from {result.archive} "
                f"({result.repository}); pulling its disks in")
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    with signals.interruptible():  # a SIGTERM before the start removes what was made; after it, see recover
        try:
            result = live_restore(ctx, options, args.pull_bandwidth << 20, on_started)
        except OSError as exc:
            raise KvmBorgError(f"live restore failed: {exc.filename or ''}: {exc.strerror or exc}") from None
    for warning in result.warnings:
        log.warning("%s", warning)
    if args.json:
        print_json(result.as_dict())
    else:
        print(f"{result.domain}: restored live from {result.archive} ({result.repository}): running after "
              f"{result.running_after_seconds:.1f}s, pulled in {result.seconds:.1f}s")
        for target, path in result.disks.items():
            print(f"  {target}: {path}")
        for label, value in (("nvram", result.nvram), ("tpm", result.tpm), ("xml", result.xml)):
            if value:
                print(f"  {label}: {value}")
    return 1 if result.warnings else 0


def run_from_args(ctx: Context, args) -> int:
    if getattr(args, "live", False):
        return run_live_from_args(ctx, args)
    if args.pull_bandwidth:
        raise UsageError("--pull-bandwidth needs --live")
    if args.to == "-" and args.json:
        raise UsageError("--to - writes the image to stdout: it takes no --json")
    options = RestoreOptions(
        domain=args.domain, archive=args.archive, repo=args.repo, target_dir=args.target_dir, name=args.name,
        define=args.define, start=args.start, disks=args.disk, to=args.to, overwrite=args.overwrite,
        host=args.host,
    )
    with signals.interruptible():  # a SIGTERM still removes temporary and partly restored files
        try:
            result = restore(ctx, options)
        except OSError as exc:  # ENOSPC, EACCES...: one line, after the partial files were removed
            raise KvmBorgError(f"restore failed: {exc.filename or ''}: {exc.strerror or exc}") from None
    for warning in result.warnings:
        log.warning("%s", warning)
    if args.json:
        print_json(result.as_dict())
    elif args.to != "-":
        print(f"{result.domain}: restored from {result.archive} ({result.repository}) in {result.seconds:.1f}s")
        for target, path in result.disks.items():
            print(f"  {target}: {path}")
        for label, value in (("nvram", result.nvram), ("tpm", result.tpm), ("xml", result.xml)):
            if value:
                print(f"  {label}: {value}")
        if result.defined:
            print(f"  defined{' and started' if result.started else ''}")
    return 1 if result.warnings else 0
