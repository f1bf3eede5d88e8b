"""`kvm-borg restore`: the command line of kvm_borg.pipeline.restore (options in, result printed)."""

from __future__ import annotations

import logging

from kvm_borg import signals
from kvm_borg.actions.common import Context, open_repository, print_json
from kvm_borg.errors import KvmBorgError, UsageError
from kvm_borg.pipeline.restore import RestoreOptions, check_options, run_restore

log = logging.getLogger(__name__)


# --- the command -------------------------------------------------------------------------------


def add_arguments(subparsers) -> None:
    """Register `kvm-borg restore`."""
    parser = subparsers.add_parser("restore", help="restore a domain from an archive")
    parser.add_argument("domain", metavar="DOMAIN", help="the archived domain's name")
    parser.add_argument("--archive", metavar="NAME", default="latest", help="archive name, or latest (default)")
    parser.add_argument("--repo", metavar="NAME", help="repository to read (default: the first configured)")
    parser.add_argument("--host", metavar="NAME", help="take the archives made on host NAME (default: this host)")
    parser.add_argument("--target-dir", metavar="DIR", help="write the images and the XML here (default: the local domain's own images, else /var/lib/libvirt/images)")
    parser.add_argument("--name", metavar="NEW", help="restore as a copy: new name, UUID and MAC addresses")
    parser.add_argument("--define", action="store_true", help="define the restored domain in libvirt")
    parser.add_argument("--start", action="store_true", help="define and start the restored domain")
    parser.add_argument("--disk", action="append", default=[], metavar="TARGET", help="only this disk (repeatable)")
    parser.add_argument("--to", metavar="FILE", help="with one --disk: write its image to FILE, into a block device (with --overwrite), or - for stdout")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files and an existing shut-off domain")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run_from_args)


def restore(ctx: Context, options: RestoreOptions):
    """Given the Context and RestoreOptions, check the options, open the repository and restore; return the
    RestoreResult."""
    check_options(options)
    repo, backend = open_repository(ctx, options.repo)
    return run_restore(ctx.settings, ctx.connection.conn, repo, backend, options)


def run_from_args(ctx: Context, args) -> int:
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
