"""One backup of a domain: plan → freeze → capture + stage → store into every repository → release;
and one backup run: every domain, then the run's explicit steps.

`kvm-borg backup` runs `run_backup`; `kvm-borg freeze` shares the plan/freeze/capture steps
(`choose_source`, `staging.capture_and_stage`) and hands the frozen images to an outside reader
instead of storing them. `ctx` is the command's context: `.settings`, `.pm` (the plugin manager)
and `.connection` (the engine's connection).

The explicit steps after the domains, in this order (their failures land in the RunSummary, so in
the exit code):
1. with `prune_after_backup: true`, prune each domain that succeeded in the repositories it was
   stored in: a failed prune or compact → an error (exit 2), as `kvm-borg prune` reports it; not
   after an interrupt (no further work is started then);
2. record the run in the run state (`kvm-borg status` reads it; its exit code includes step 1):
   cannot be written → a warning (exit 1);
3. rewrite the metrics textfile (`metrics_file:`) from the run state: cannot be written → a warning
   (exit 1).
Then the notifiers get `kvm_borg_backup_finished`, each isolated (a failing one is only logged).
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from kvm_borg import failpoints, metadata, parallel_plan, run_record, run_state, signals
from kvm_borg.engine.capture import is_active
from kvm_borg.engine.planning import DomainHandle, handle_for, make_plan
from kvm_borg.errors import EngineError, Interrupted, KvmBorgError
from kvm_borg.locks import domain_lock
from kvm_borg.models import DomainPlan, DomainResult, FreezeResult, FrozenSource, ReleaseResult, RunSummary
from kvm_borg.sizes import content_size
from kvm_borg.pipeline import parallel, prune, staging
from kvm_borg.pipeline.store import store_all
from kvm_borg.plugins import notify

log = logging.getLogger(__name__)


def fresh_timestamp(previous: str | None) -> str:
    """Return the run's timestamp, waiting for the next second if `previous` (same domain) used this one."""
    timestamp = metadata.utc_timestamp()
    while timestamp == previous:
        time.sleep(0.1)
        timestamp = metadata.utc_timestamp()
    return timestamp


def prepare_state_dir(settings) -> None:
    """Given the Settings, create state_dir (0711: QEMU must reach overlays below it, nobody may list it)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o711)


def choose_source(ctx, handle: DomainHandle, plan: DomainPlan) -> FrozenSource:
    """Given a domain and its plan, return the FrozenSource the plugins choose (KvmBorgError if none)."""
    source = ctx.pm.hook.kvm_borg_frozen_source(domain=handle, plan=plan, settings=ctx.settings)
    if source is None:
        raise KvmBorgError(f"domain '{plan.name}': no plugin can freeze its disks")
    return source


def one_line(exc: BaseException) -> str:
    """Given any exception, return its one-line description."""
    if isinstance(exc, KvmBorgError):
        return str(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"


def domain_error(name: str, exc: Exception) -> str:
    """Given a domain name and what failed its backup, return the one line for its result: a
    KvmBorgError's message names the domain already, an engine error or any other is prefixed with it."""
    if isinstance(exc, KvmBorgError) and not isinstance(exc, EngineError):
        return str(exc)
    return f"domain '{name}': {one_line(exc)}"


def release(ctx, source: FrozenSource, plan: DomainPlan, staging_dir, result: DomainResult,
            failure: BaseException | None) -> ReleaseResult:
    """Given the frozen source and what the freeze/store phase raised (None: nothing), merge the
    overlays back with signals shielded and remove the staging files; return the ReleaseResult.

    The merge is always attempted, whatever failed before. An interrupt stays an interrupt: when the
    merge fails after (or while) a signal arrived, the merge's error (it names `kvm-borg recover`)
    is logged and recorded in `result`, and Interrupted is raised with that error as its cause, so
    the run stops (exit 130) instead of going on with the next domain. When the merge fails after
    another error, that error is logged first, then the merge's CommitError propagates."""
    name = plan.name
    try:
        with signals.shielded():
            notify(ctx.pm, "kvm_borg_before_commit", domain=name, disks=list(plan.disks))
            released = source.release()
            result.commit_seconds = released.seconds
            result.warnings.extend(released.warnings)
            notify(ctx.pm, "kvm_borg_after_commit", domain=name, disks=list(plan.disks), seconds=released.seconds)
    except Interrupted as exc:  # a signal arrived during the merge, which may have failed
        if exc.__cause__ is not None:
            result.error = str(exc.__cause__)
            log.error("%s", result.error)
        raise
    except BaseException as exc:
        if isinstance(failure, Interrupted):
            result.error = str(exc)
            log.error("%s", result.error)
            raise failure from exc
        if failure is not None:
            log.error("domain '%s': %s", name, one_line(failure))
        raise
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return released


def disk_report(freeze: FreezeResult, released: ReleaseResult) -> list[dict]:
    """Given what the source froze and what releasing it reported, return the per-disk lines of the domain's
    result: target, bytes_read (what the readers were served where the source counted it, else the size of
    the files read), segments_dirty, segments_total and full_read_reason (None for the snapshot method)."""
    stats = {s.target: s for s in freeze.read_stats}
    report = []
    for disk in freeze.disks:
        stat = stats.get(disk.target)
        if disk.target in released.bytes_read:
            read = released.bytes_read[disk.target]
        elif stat is not None:
            read = stat.bytes_read
        else:
            read = sum(_size_or_zero(path) for path in (disk.path, *disk.backing_chain))
        report.append({
            "target": disk.target,
            "bytes_read": read,
            "segments_dirty": stat.segments_dirty if stat else None,
            "segments_total": stat.segments_total if stat else None,
            "full_read_reason": stat.full_read_reason if stat else None,
        })
    return report


def _size_or_zero(path: str) -> int:
    try:
        return content_size(path)
    except OSError:
        return 0


def backup_locked(ctx, handle: DomainHandle, backends, excluded: list[str], result: DomainResult,
                  previous_timestamp: str | None = None) -> None:
    """Given a locked domain, [(repo dict, backend)], the disk targets to leave out and its DomainResult,
    plan, freeze, stage, store into every repository and release, filling `result`. A shut-off domain
    that started while its images were read is backed up once more, live (`previous_timestamp`: the
    first attempt's)."""
    settings, name = ctx.settings, handle.name
    signals.check_stop()  # a parallel run being interrupted starts nothing more
    timestamp = fresh_timestamp(previous_timestamp)
    plan = make_plan(handle, settings, excluded, timestamp)
    if previous_timestamp is None:  # the live retry plans again: its warnings are the first plan's
        result.warnings.extend(plan.warnings)
    source = choose_source(ctx, handle, plan)
    staging_dir = settings.staging_dir / plan.uuid
    archive = metadata.archive_name(name, timestamp)
    notify(ctx.pm, "kvm_borg_before_snapshot", domain=name, disks=list(plan.disks), quiesce=plan.quiesce)
    failure: BaseException | None = None
    freeze: FreezeResult | None = None
    try:
        freeze = source.freeze()
        result.method = freeze.method
        result.consistency = freeze.consistency
        result.freeze_seconds = freeze.freeze_seconds
        result.warnings.extend(freeze.warnings)
        notify(ctx.pm, "kvm_borg_after_snapshot", domain=name, disks=freeze.disks, quiesced=freeze.quiesced,
               seconds=freeze.freeze_seconds)
        signals.check_stop()
        staged = staging.capture_and_stage(handle, plan, freeze, settings, staging_dir, archive=archive,
                                           timestamp=timestamp)
        result.warnings.extend(f"domain '{name}': not in the archive: {piece}" for piece in staged.missing)
        request = staging.archive_request(name, archive, timestamp, staged.meta, freeze, staging_dir)
        result.warnings.extend(filter(None, [source.mark_stage("storing")]))
        failpoints.reached("storing")
        signals.check_stop()
        result.stores = store_all(ctx, name, backends, request)
        if not all(store.ok for store in result.stores):
            signals.check_stop()  # stopped by the interrupt: this domain ends as a sequential run's would
    except BaseException as exc:  # remembered so a failing merge cannot replace an interrupt
        failure = exc
        raise
    finally:
        released = release(ctx, source, plan, staging_dir, result, failure)
        if freeze is not None:
            result.disks = disk_report(freeze, released)
    if released.inconsistent and previous_timestamp is None and is_active(handle):
        signals.check_stop()
        result.warnings.append(
            f"archive {archive} of domain '{name}' may be inconsistent (the domain started while its images "
            "were read); taking a live backup now"
        )
        log.warning("%s", result.warnings[-1])
        result.stores = []
        backup_locked(ctx, handle, backends, excluded, result, previous_timestamp=timestamp)
        return
    failed = [s.repository for s in result.stores if not s.ok]
    result.ok = bool(result.stores) and not failed
    if failed:
        result.error = f"repository {', '.join(failed)} failed"


def backup_domain(ctx, name: str, backends, cli_excluded: list[str]) -> DomainResult:
    """Given a domain name, [(repo dict, backend)] and the --exclude-disk targets, back it up; return its
    DomainResult.

    Every failure, of any type, is caught into the result (the run goes on with the next domain)
    except an interrupting signal, which propagates after the merge was attempted, even when the
    merge failed."""
    result = DomainResult(domain=name, ok=False)
    started = time.monotonic()
    stage = "plan"
    try:
        handle = handle_for(ctx.connection, name)
        excluded = ctx.settings.domains["disks_exclude"].get(name, []) + cli_excluded
        prepare_state_dir(ctx.settings)
        with domain_lock(ctx.settings.lock_dir, handle.uuid, name):
            stage = "backup"
            backup_locked(ctx, handle, backends, excluded, result)
    except Exception as exc:  # any type: reported for this domain, the run goes on
        result.ok = False
        result.error = domain_error(name, exc)
        log.error("%s", result.error)
        if not isinstance(exc, KvmBorgError):
            log.debug("traceback of the unexpected error", exc_info=True)  # shown with -vv
        notify(ctx.pm, "kvm_borg_on_error", domain=name, stage=stage, error=exc)
    finally:
        result.seconds = time.monotonic() - started
    return result


def prune_step(settings, summary: RunSummary, backends) -> None:
    """Step 1: given the Settings, the RunSummary and the run's [(repo dict, backend)], prune after the
    backup if `prune_after_backup` is set and a domain succeeded; its failures become errors of the
    summary (exit 2, as `kvm-borg prune` reports them), a record that cannot be written a warning."""
    if not settings.prune_after_backup or not any(result.ok for result in summary.domains):
        return
    outcomes: list[dict] = []
    try:
        outcomes = prune.prune_after_backup(settings, summary, backends)
    except OSError as exc:  # the prune ran, its record could not be written
        summary.warnings.append(f"prune after backup: cannot record it in {settings.state_dir}: "
                                f"{exc.strerror or exc}")
    summary.errors.extend(f"{line} (prune after backup)" for line in prune.failures(outcomes))


def record_run(settings, summary: RunSummary) -> None:
    """Step 2: given the Settings and the run's RunSummary, record the run (with its exit code so far) in
    the run state; a run state that cannot be written becomes a warning of the summary (exit 1)."""
    configured = [repo["name"] for repo in settings.repositories]
    try:
        run_state.update(settings.state_dir, lambda state: run_state.record_backup(state, summary, configured))
    except OSError as exc:
        warning = f"cannot record the run in {settings.state_dir}: {exc.strerror or exc}"
        log.warning("%s", warning)
        summary.warnings.append(warning)


def metrics_step(settings, summary: RunSummary) -> None:
    """Step 3: given the Settings and the RunSummary, rewrite the metrics textfile from the run state;
    a file that cannot be written becomes a warning of the summary (exit 1)."""
    warning = run_record.write_metrics(settings, run_state.load(settings.state_dir))
    if warning:
        summary.warnings.append(warning)


def finish_run(ctx, summary: RunSummary, backends, interrupted: bool) -> None:
    """Given the run's RunSummary and [(repo dict, backend)], run the explicit steps in order (no prune
    after an interrupt), then tell the notifiers (each isolated)."""
    if not interrupted:
        prune_step(ctx.settings, summary, backends)
    record_run(ctx.settings, summary)
    metrics_step(ctx.settings, summary)
    notify(ctx.pm, "kvm_borg_backup_finished", summary=summary)


def backup_domains(ctx, domains: list[str], backends, cli_excluded: list[str], summary: RunSummary,
                   on_finished=None) -> None:
    """Given the domain names, [(repo dict, backend)], the --exclude-disk targets and the run's RunSummary,
    back every domain up, filling `summary.domains` in the order of `domains`: one after the other with
    `jobs: 1`, else `jobs` at a time (kvm_borg.pipeline.parallel; `on_finished(done, total, result)` is
    called as each ends). An interrupt propagates once the domains started have been merged back; the
    summary then holds those that finished."""
    jobs = ctx.settings.jobs
    if jobs <= 1 or len(domains) <= 1:
        for name in domains:
            summary.domains.append(backup_domain(ctx, name, backends, cli_excluded))
        return
    finished: dict[int, DomainResult] = {}

    def done(index: int, result: DomainResult) -> None:
        finished[index] = result
        if on_finished is not None:
            on_finished(len(finished), len(domains), result)

    try:
        parallel.backup_in_parallel(domains, jobs, lambda name: backup_domain(ctx, name, backends, cli_excluded),
                                    done)
    finally:
        summary.domains.extend(parallel_plan.in_run_order(domains, finished))


def run_backup(ctx, domains: list[str], backends, cli_excluded: list[str], on_finished=None) -> RunSummary:
    """Given the domain names, the opened [(repo dict, backend)] and the --exclude-disk targets, back up
    every domain (`jobs` at a time, see `backup_domains`; `on_finished(done, total, result)` with
    jobs > 1), then run the explicit steps; return the RunSummary. An interrupt stops the run after
    the merges of the domains under way and propagates once the steps ran."""
    summary = RunSummary()
    try:  # the run in progress, for the metrics' run deadline; what cannot be written warns again at the end
        run_record.start_run(ctx.settings, len(domains))
    except OSError as exc:
        log.warning("cannot record the run's start in %s: %s", ctx.settings.state_dir, exc.strerror or exc)
    with signals.interruptible():
        try:
            backup_domains(ctx, domains, backends, cli_excluded, summary, on_finished)
        except Interrupted:
            finish_run(ctx, summary, backends, interrupted=True)
            raise
        finish_run(ctx, summary, backends, interrupted=False)
    return summary
