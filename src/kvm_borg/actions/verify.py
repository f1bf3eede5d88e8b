"""`kvm-borg verify`: the restore drill.

Restore the archive into a scratch directory under a temporary name, run `qemu-img check` on
every disk (the repository's own authenticated reads vouch for the bytes), and with `--boot`
define the copy isolated (sanitized by kvm_borg.xml_sanitize, no network interfaces; checked again
as libvirt holds it before it starts), start it, wait for a sign of life, then
destroy and undefine it. Everything is cleaned up, whatever fails. Reports the time to
restore and the time to the first sign of life (RTO).

With `--boot --live` the copy boots the way `restore --live` boots a domain (kvm_borg.pipeline.live_restore):
it runs within seconds on local qcow2 images backed by the exposed archive while its disks are pulled in,
so the RTO is the time to its first sign of life that way. The drill does not wait for the pull: once the
guest shows life it stops the pull, destroys the copy and removes its images and the exposure, and reports
whether the pull had ended (and when) or what was not pulled in yet. No `qemu-img check` runs (the
images are overlays of the archive, which the guest's boot reads).
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
from dataclasses import dataclass, field, replace

from kvm_borg import live_restore_plan, restore_plan, run_record, run_state, signals
from kvm_borg.pipeline.backup import prepare_state_dir
from kvm_borg.actions.common import Context, open_repository, print_json
from kvm_borg.engine import lifecycle, live_pull
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
    live: bool = False
    running_after_seconds: float | None = None  # --live: the copy runs (restore_seconds says the same)
    sign_of_life_after_seconds: float | None = None  # --live: == rto_seconds
    pull: dict | None = None  # --live: {done, done_after_seconds, not_pulled}
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


def live_isolation_violations(domain_xml: str, *, images: set[str], backings: dict[str, str],
                              scratch_dir: str) -> list[str]:
    """Given the XML libvirt holds for a live verify copy, its local images, {target: the exposed archived
    image} and the scratch directory, return what breaks its isolation: a backing file other than the
    exposed archive, and what isolation_violations finds once those backing stores are set aside (their
    unrelabelled read-only source is the live restore's own)."""
    problems = []
    found = live_restore_plan.backing_sources(domain_xml)
    if found != backings:
        problems.append(f"backing files {found}, not the exposed archive {backings}")
    plain = live_restore_plan.without_backing(domain_xml, set(found))
    return problems + isolation_violations(plain, images=images, scratch_dir=scratch_dir)


def _live_drill(ctx: Context, report: VerifyReport, repository: dict, backend, options: RestoreOptions,
                started: float, boot_timeout: float, alive_seconds: float, bandwidth: int, written: dict) -> None:
    """Given the report, the opened repository, the drill's RestoreOptions (a new name in the scratch dir,
    isolated), the drill's start (monotonic), the boot options, a pull bandwidth per disk (bytes/s, 0:
    unlimited) and a dict, boot the copy through the live restore, wait for its
    sign of life while its disks are pulled, then let the live restore discard it; fill the report, and the
    dict with the copy's `nvram` and `tpm` paths as soon as they are written (for the caller to remove)."""
    from kvm_borg.pipeline.live_restore import check_live_options, run_live_restore

    check_live_options(options)
    agent = {"channel": False}

    def before_start(defined_xml: str, result) -> None:
        if not defined_xml:
            raise KvmBorgError(f"the verify copy {options.name} is not defined")
        problems = live_isolation_violations(defined_xml, images=set(result.disks.values()),
                                             backings=result.backings, scratch_dir=options.target_dir)
        if problems:
            raise KvmBorgError(f"the verify copy is not isolated ({'; '.join(problems)}); not started")
        agent["channel"] = has_guest_agent_channel(defined_xml)
        written.update(nvram=result.nvram, tpm=result.tpm)

    def drill(dom, result, advance_pull) -> dict:
        running = time.monotonic() - started
        pulled: dict = {"at": None}

        def poll() -> None:
            if pulled["at"] is None and advance_pull():
                pulled["at"] = time.monotonic() - started

        boot = lifecycle.wait_for_sign_of_life(dom, agent["channel"], boot_timeout, alive_seconds, poll=poll)
        alive = time.monotonic() - started
        poll()
        pending = sorted(live_pull.backed_targets(dom) & set(result.backings))
        if not pending and pulled["at"] is None:  # it ended between the last look and this one
            pulled["at"] = alive
        return {"running": running, "boot": boot, "alive": alive, "pulled": pulled["at"], "pending": pending}

    result = run_live_restore(ctx.settings, ctx.connection.conn, repository, backend, options,
                              bandwidth=bandwidth, before_start=before_start, drill=drill)
    found = result.drill
    report.archive, report.repository = result.archive, result.repository
    report.warnings += result.warnings
    report.running_after_seconds = report.restore_seconds = found["running"]
    report.boot = found["boot"]
    report.sign_of_life_after_seconds = report.rto_seconds = found["alive"]
    report.pull = {"done": not found["pending"], "done_after_seconds": found["pulled"],
                   "not_pulled": found["pending"]}
    for target, path in result.disks.items():
        report.disks[target] = {"path": path, "format": "qcow2", "backing": result.backings.get(target),
                                "check": "booted live from the archive (no qemu-img check)", "ok": True}


def run_verify(ctx: Context, domain: str, *, archive: str | None = None, repo: str | None = None,
               host: str | None = None, boot: bool = False, boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
               alive_seconds: float = DEFAULT_ALIVE_SECONDS, live: bool = False,
               pull_bandwidth: int = 0) -> VerifyReport:
    """Given a domain and options (`live`: boot the copy through the live restore, needs `boot`, pulling at
    most `pull_bandwidth` bytes/s per disk, 0: unlimited), run the restore drill; return the VerifyReport
    (ok or not)."""
    report = VerifyReport(domain=domain, live=live)
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
        if live and not boot:
            raise UsageError("verify --live boots the copy through the live restore: it needs --boot")
        if pull_bandwidth and not live:
            raise UsageError("--pull-bandwidth needs --live")
        if pull_bandwidth < 0:
            raise UsageError("--pull-bandwidth must be 0 (unlimited) or more MiB/s")
        repository, backend = open_repository(ctx, repo)
        opened = True  # from here on a UsageError is the archive's fault (refused, hostile): a failed drill
        if live:
            holder: dict = {}
            _live_drill(ctx, report, repository, backend, replace(options, define=False), started, boot_timeout,
                        alive_seconds, pull_bandwidth, holder)
            tpm_dir, nvram = holder.get("tpm"), holder.get("nvram")
        else:
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
        if boot:  # the live restore discards its own copy: then this finds nothing
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


def live_report_lines(report: VerifyReport) -> list[str]:
    """Given the VerifyReport of a `--boot --live` drill, return its text lines (the times, the pull, the RTO)."""
    lines = []
    if report.running_after_seconds is not None:
        lines.append(f"running after {report.running_after_seconds:.1f}s (booted live from the archive)")
    if report.boot and report.sign_of_life_after_seconds is not None:
        lines.append(f"sign of life after {report.sign_of_life_after_seconds:.1f}s: {report.boot['sign_of_life']}")
    if report.pull is not None:
        if report.pull["done"]:
            lines.append(f"pull done after {report.pull['done_after_seconds']:.1f}s")
        else:
            lines.append(f"pull not done when the guest showed life ({', '.join(report.pull['not_pulled'])} not "
                         "pulled in yet): the drill stopped it and removed the copy")
    if report.rto_seconds is not None:
        lines.append(f"RTO (time to the first sign of life, booted live): {report.rto_seconds:.1f}s")
    return lines


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
                            boot_timeout=args.boot_timeout, alive_seconds=args.alive_seconds, live=args.live,
                            pull_bandwidth=args.pull_bandwidth << 20)
    record_drill(ctx, report, args.repo)
    if args.json:
        print_json(report.as_dict())
    else:
        status = "ok" if report.ok else "FAILED"
        print(f"{report.domain}: verify {status} ({report.archive or '-'} in {report.repository or '-'})")
        if report.live:
            for line in live_report_lines(report):
                print(f"  {line}")
        else:
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
