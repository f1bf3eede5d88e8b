"""`kvm-borg freeze --expose DIR` / `kvm-borg thaw`: hand frozen domains to another backup tool (borgmatic).

The flow is kvm_borg.pipeline.freeze (the backup pipeline's plan/freeze/capture steps, then an
exposure instead of a store): each domain's frozen images appear read-only at stable paths,

    DIR/<domain>/meta.json, domain.xml, domain-live.xml (+ NVRAM, TPM state, network/pool XML)
    DIR/<domain>/disks/<target>.<format>             read-only bind mount of the frozen image
    DIR/<domain>/disks/<target>.backing<N>.<format>  ... and of each backing file below it

and meta.json names those paths as the images' places in the archive, so `kvm-borg restore` works
on an archive made by borgmatic. The paths do not change from run to run (borg's files cache).
`thaw` unmounts, merges back and removes what freeze created; idempotent, and `kvm-borg recover`
does the same after a crash. A shut-off domain is exposed as it is (no snapshot); if its images
change before `thaw` (it was started), thaw warns that the archive may be inconsistent.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvm_borg.actions.common import Context, print_json, resolve_domains
from kvm_borg.errors import UsageError, exit_code
from kvm_borg.pipeline.freeze import freeze_domain, run_thaw


# --- the command line ---------------------------------------------------------------------------


def expose_dir_from(value: str) -> Path:
    """Given --expose, return it absolute with symlinks resolved (mount points are listed that way)."""
    return Path(os.path.realpath(value))


def freeze_from_args(ctx: Context, args) -> int:
    expose_dir = expose_dir_from(args.expose)
    if expose_dir == Path("/") or (expose_dir.exists() and not expose_dir.is_dir()):
        raise UsageError(f"--expose {args.expose}: expected a directory")
    domains = resolve_domains(ctx, args.domains, args.all)
    expose_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    outcomes = []
    for name in domains:
        excluded = ctx.settings.domains["disks_exclude"].get(name, []) + args.exclude_disk
        outcomes.append(freeze_domain(ctx, name, expose_dir, excluded))
    if args.json:
        print_json(outcomes)
    else:
        for o in outcomes:
            print(f"{o['domain']}: " + (f"frozen ({o['consistency']}), exposed at {o['path']}" if o["ok"]
                                        else f"FAILED: {o['error']}"))
            for warning in o["warnings"]:
                print(f"  warning: {warning}")
    return exit_code(failed=any(not o["ok"] for o in outcomes), warned=any(o["warnings"] for o in outcomes))


def thaw_from_args(ctx: Context, args) -> int:
    outcomes = run_thaw(ctx, expose_dir_from(args.expose) if args.expose else None, args.domains)
    if args.json:
        print_json(outcomes)
    else:
        if not outcomes:
            print("nothing to thaw")
        for o in outcomes:
            print(f"{o['domain']}: " + ("thawed" if o["ok"] else f"FAILED: {o['error']}"))
            for warning in o["warnings"]:
                print(f"  warning: {warning}")
    return exit_code(failed=any(not o["ok"] for o in outcomes), warned=any(o["warnings"] for o in outcomes))
