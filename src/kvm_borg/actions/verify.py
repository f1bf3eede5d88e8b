"""`kvm-borg verify`: the restore drill.

Restore the archive into a scratch directory under a temporary name, run `qemu-img check` on
every disk (the repository's own authenticated reads vouch for the bytes), and with `--boot`
define the copy isolated (sanitized by kvm_borg.xml_sanitize, no network interfaces; checked again
as libvirt holds it before it starts), start it, wait for a sign of life, then
destroy and undefine it. Everything is cleaned up, whatever fails. Reports the time to
restore and the time to the first sign of life (RTO).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from kvm_borg import restore_plan, run_record, run_state, signals
from kvm_borg.pipeline.backup import prepare_state_dir
from kvm_borg.actions.common import Context, open_repository, print_json
from kvm_borg.engine import lifecycle
from kvm_borg.engine.domain_xml import has_guest_agent_channel
from kvm_borg.errors import KvmBorgError, UsageError
from kvm_borg.pipeline.restore import RestoreOptions, check_options, run_restore
from kvm_borg.tools import run_tool
from kvm_borg.xml_sanitize import isolation_violations

log = logging.getLogger(__name__)

DEFAULT_BOOT_TIMEOUT = 300.0
DEFAULT_ALIVE_SECONDS = 10.0
_QEMU_IMG_CHECK_UNSUPPORTED = 63
# `qemu-img check` reads every qcow2 metadata cluster: a large image takes a while.
_CHECK_TIMEOUT = 3600.0


@dataclass
class VerifyReport:
    domain: str
    archive: str | None = None
    repository: str | None = None
    ok: bool = False
    restore_seconds: float | None = None
    disks: dict = field(default_factory=dict)
    boot: dict | None = None
    rto_seconds: float | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bad_input: bool = False  # a UsageError before the repository was opened: not a drill, not recorded

    def as_dict(self) -> dict:
        rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()
                   if k != "bad_input"}
        return rounded


def check_image(path: str, fmt: str, expected_size: int) -> dict:
    """Given a restored image, return {check, virtual_size, ok}: `qemu-img check` and the size meta.json recorded."""
    outcome: dict = {"path": path, "format": fmt}
    proc = run_tool(["qemu-img", "check", "-f", fmt, path], what=f"check {path}", timeout=_CHECK_TIMEOUT,
                    ok_codes=None)
    if proc.returncode == 0:
        outcome["check"] = "no errors"
    elif proc.returncode == _QEMU_IMG_CHECK_UNSUPPORTED:
        outcome["check"] = f"not applicable to {fmt}"
    elif proc.returncode == 3:
        outcome["check"] = "leaked clusters only (harmless)"
    else:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        outcome["check"] = f"failed: {lines[-1] if lines else proc.returncode}"
        outcome["ok"] = False
        return outcome
    info = run_tool(["qemu-img", "info", "--output=json", "-f", fmt, path], what=f"read {path}", ok_codes=None)
    size = json.loads(info.stdout).get("virtual-size") if info.returncode == 0 else None
    outcome["virtual_size"] = size
    outcome["ok"] = size is not None and (not expected_size or size == expected_size)
    if not outcome["ok"]:
        outcome["check"] += f"; virtual size {size}, archive says {expected_size}"
    return outcome


def run_verify(ctx: Context, domain: str, *, archive: str | None = None, repo: str | None = None,
               host: str | None = None, boot: bool = False, boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
               alive_seconds: float = DEFAULT_ALIVE_SECONDS) -> VerifyReport:
    """Given a domain and options, run the restore drill; return the VerifyReport (ok or not)."""
    report = VerifyReport(domain=domain)
    prepare_state_dir(ctx.settings)
    root = ctx.settings.state_dir / "verify"
    root.mkdir(mode=0o711, exist_ok=True)
    os.chmod(root, 0o711)  # QEMU must reach the images inside
    scratch = tempfile.mkdtemp(prefix="drill-", dir=root)
    os.chmod(scratch, 0o711)
    temp_name = f"kvm-borg-verify-{restore_plan.safe_file_name(domain)[:40]}-{secrets.token_hex(3)}"
    tpm_dir = nvram = None
    opened = False
    try:
        started = time.monotonic()
        options = RestoreOptions(domain=domain, archive=archive, repo=repo, target_dir=scratch, name=temp_name,
                                 define=boot, isolate=True, host=host)
        check_options(options)
        repository, backend = open_repository(ctx, repo)
        opened = True  # from here on a UsageError is the archive's fault (refused, hostile): a failed drill
        result = run_restore(ctx.settings, ctx.connection.conn, repository, backend, options)
        report.restore_seconds = time.monotonic() - started
        report.archive, report.repository, tpm_dir = result.archive, result.repository, result.tpm
        nvram = result.nvram  # restore puts it under libvirt's NVRAM directory, outside the scratch dir
        report.warnings += result.warnings
        sizes = {d["target"]: int(d.get("virtual_size") or 0) for d in result.meta["disks"]}
        for target, path in result.disks.items():
            outcome = check_image(path, result.formats[target], sizes.get(target, 0))
            report.disks[target] = outcome
            if not outcome["ok"]:
                report.errors.append(f"disk {target}: {outcome['check']}")
        if boot and not report.errors:
            conn = ctx.connection.conn
            defined = lifecycle.inactive_xml(conn, temp_name)
            if defined is None:
                raise KvmBorgError(f"the verify copy {temp_name} is not defined")
            # Defined from the sanitized XML; what libvirt holds is checked once more before it runs.
            problems = isolation_violations(defined, images=set(result.disks.values()), scratch_dir=scratch)
            if problems:
                raise KvmBorgError(f"the verify copy is not isolated ({'; '.join(problems)}); not started")
            agent = has_guest_agent_channel(result.archived_xml)
            dom = lifecycle.lookup(conn, temp_name)
            lifecycle.start(dom)
            report.boot = lifecycle.wait_for_sign_of_life(dom, agent, boot_timeout, alive_seconds)
            report.rto_seconds = report.restore_seconds + report.boot["seconds"]
        elif not boot:
            report.rto_seconds = None
    except KvmBorgError as exc:  # an EngineError too: "libvirt: ..."
        report.errors.append(str(exc))
        report.bad_input = isinstance(exc, UsageError) and not opened
    except OSError as exc:
        report.errors.append(f"{exc.filename or 'scratch directory'}: {exc.strerror or exc}")
    finally:
        if boot:
            for problem in lifecycle.remove(ctx.connection.conn, temp_name):
                log.warning("%s", problem)
        if tpm_dir:
            shutil.rmtree(tpm_dir, ignore_errors=True)
        if nvram:
            with contextlib.suppress(OSError):
                os.unlink(nvram)
        shutil.rmtree(scratch, ignore_errors=True)
    report.ok = not report.errors
    return report


def record_drill(ctx: Context, report: VerifyReport, repo: str | None) -> None:
    """Given a drill's VerifyReport and --repo, record it in the run state and the metrics; not bad input
    (a UsageError before the repository opened) nor a drill that found no archive of a domain the run
    state does not know. A record that cannot be written becomes a warning of the report."""
    names = [r["name"] for r in ctx.settings.repositories]
    repository = report.repository or repo or (names[0] if names else None)
    if report.bad_input or repository not in names:
        return
    error = report.errors[0] if report.errors else None
    try:
        if report.archive is None and report.domain not in run_state.load(ctx.settings.state_dir)["domains"]:
            return  # no archive of a domain kvm-borg never recorded (a typo?): not a series that alerts forever
        report.warnings += run_record.update_state(ctx.settings, lambda state: run_state.record_verify(
            state, report.domain, repository, not report.errors, error, report.archive, report.restore_seconds,
            report.rto_seconds))
    except OSError as exc:
        report.warnings.append(f"cannot record the drill in {ctx.settings.state_dir}: {exc.strerror or exc}")


def run_from_args(ctx: Context, args) -> int:
    with signals.interruptible():  # a SIGTERM still destroys the copy and removes the scratch directory
        report = run_verify(ctx, args.domain, archive=args.archive, repo=args.repo, host=args.host, boot=args.boot,
                            boot_timeout=args.boot_timeout, alive_seconds=args.alive_seconds)
    record_drill(ctx, report, args.repo)
    if args.json:
        print_json(report.as_dict())
    else:
        status = "ok" if report.ok else "FAILED"
        print(f"{report.domain}: verify {status} ({report.archive or '-'} in {report.repository or '-'})")
        if report.restore_seconds is not None:
            print(f"  restore: {report.restore_seconds:.1f}s")
        for target, outcome in report.disks.items():
            print(f"  {target}: {outcome['check']}")
        if report.boot:
            print(f"  boot: {report.boot['sign_of_life']} after {report.boot['seconds']:.1f}s")
        if report.rto_seconds is not None:
            print(f"  RTO (restore + first sign of life): {report.rto_seconds:.1f}s")
        for warning in report.warnings:
            print(f"  warning: {warning}")
        for error in report.errors:
            print(f"  error: {error}")
    if not report.ok:
        return 2
    return 1 if report.warnings else 0
