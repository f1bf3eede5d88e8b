"""`kvm-borg backup`: freeze → store into every repository → merge back, for each domain."""

from __future__ import annotations

import logging
import shutil
import time

import libvirt

from kvm_borg import failpoints, metadata, signals
from kvm_borg.engine import host_state
from kvm_borg.actions.common import Context, check_disk_targets, ensure_state_dir, open_repositories, print_json, resolve_domains
from kvm_borg.engine.planning import DomainHandle, handle_for, make_plan
from kvm_borg.errors import Interrupted, KvmBorgError
from kvm_borg.locks import domain_lock
from kvm_borg.models import ArchiveRequest, DomainResult, RunSummary, StoreResult
from kvm_borg.plugins import notify

log = logging.getLogger(__name__)


def _versions(conn: libvirt.virConnect) -> tuple[str, str]:
    def dotted(number: int) -> str:
        return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"

    return dotted(conn.getLibVersion()), dotted(conn.getVersion())


def _store_all(ctx: Context, name: str, backends, request: ArchiveRequest) -> list[StoreResult]:
    """Store one request into every repository; return their StoreResults in the given order.

    One failing repository does not stop the others. Repositories at distinct locations are
    written at the same time, one thread each; those sharing a location (a backend's
    `location`) one after the other. An interrupt stops every child process and propagates,
    so the caller still merges the overlays back. When `store_timeout` passes, the children
    still running are stopped (see `execute.stop_scope_after`) and every repository not done
    by then fails with "store_timeout ... passed"."""
    from kvm_borg.execute import ChildScope, call_in_parallel, duration_text, stop_scope_after

    scope = ChildScope()
    timeout = getattr(ctx.settings, "store_timeout", None)
    expired = None  # the Event stop_scope_after sets when store_timeout passed

    def store_one(repo, backend) -> StoreResult:
        try:
            result = backend.store(request)
        except KvmBorgError as exc:
            result = StoreResult(repository=repo["name"], ok=False, error=str(exc))
        except Exception as exc:  # a backend's bug must not cost the other repositories their archive
            log.exception("domain '%s': repository %s: unexpected error", name, repo["name"])
            result = StoreResult(repository=repo["name"], ok=False, error=f"unexpected error: {exc}")
        if not result.ok and expired is not None and expired.is_set():
            result.error = f"store_timeout {duration_text(timeout)} passed: the repository writes were stopped"
        return result

    def report(repo, result: StoreResult) -> None:
        if not result.ok:
            log.error("domain '%s': repository %s failed: %s", name, repo["name"], result.error)
        else:
            log.info(
                "domain '%s': stored %s in %s (%d bytes read, %d bytes added) in %.1fs",
                name, result.archive, repo["name"], result.original_size, result.deduplicated_size, result.seconds,
            )
        notify(ctx.pm, "kvm_borg_after_store", domain=name, repository=repo["name"], result=result)

    groups: dict[str, list] = {}
    for repo, backend in backends:
        location = str(getattr(backend, "location", None) or repo["name"]).rstrip("/")
        groups.setdefault(location, []).append((repo, backend))
    with stop_scope_after(scope, timeout) as expired:
        if len(groups) <= 1:
            results = []
            for repo, backend in backends:
                results.append(scope.call(store_one, repo, backend))
                report(repo, results[-1])
            return results

        group_list = list(groups.values())
        by_name: dict[str, StoreResult] = {}

        def finished(index: int, group_results: list[StoreResult]) -> None:
            for (repo, _backend), result in zip(group_list[index], group_results):
                by_name[repo["name"]] = result
                report(repo, result)

        calls = [lambda group=group: [store_one(repo, backend) for repo, backend in group] for group in group_list]
        call_in_parallel(calls, finished, scope=scope)
        return [by_name[repo["name"]] for repo, _backend in backends]


def _fresh_timestamp(previous: str | None) -> str:
    """Return the run's timestamp, waiting for the next second if `previous` (same domain) used this one."""
    timestamp = metadata.utc_timestamp()
    while timestamp == previous:
        time.sleep(0.1)
        timestamp = metadata.utc_timestamp()
    return timestamp


def _merge_back(ctx: Context, source, name: str, plan, staging, result: DomainResult,
                failure: BaseException | None):
    """Given the frozen source and what the freeze/store phase raised (None: nothing), merge the
    overlays back with signals shielded and remove the staging files; return the ReleaseResult.

    The merge is always attempted, whatever failed before. An interrupt stays an interrupt: when the
    merge fails after (or while) a signal arrived, the merge's error (it names `kvm-borg recover`)
    is logged and recorded in `result`, and Interrupted is raised with that error as its cause, so
    the run stops (exit 130) instead of going on with the next domain. When the merge fails after
    another error, that error is logged first, then the merge's CommitError propagates."""
    try:
        with signals.shielded():
            notify(ctx.pm, "kvm_borg_before_commit", domain=name, disks=list(plan.disks))
            release = source.release()
            result.commit_seconds = release.seconds
            result.warnings.extend(release.warnings)
            notify(ctx.pm, "kvm_borg_after_commit", domain=name, disks=list(plan.disks), seconds=release.seconds)
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
            log.error("domain '%s': %s", name, _one_line(failure))
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return release


def _one_line(exc: BaseException) -> str:
    """Given any exception, return its one-line description (libvirt's message for libvirt errors)."""
    if isinstance(exc, libvirt.libvirtError):
        return f"libvirt: {exc.get_error_message()}"
    if isinstance(exc, KvmBorgError):
        return str(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"


def _backup_locked(ctx: Context, handle: DomainHandle, backends, excluded: list[str], result: DomainResult,
                   previous_timestamp: str | None = None) -> None:
    settings, name = ctx.settings, handle.name
    timestamp = _fresh_timestamp(previous_timestamp)
    plan = make_plan(handle, settings, excluded, timestamp)
    source = ctx.pm.hook.kvm_borg_frozen_source(domain=handle, plan=plan, settings=settings)
    if source is None:
        raise KvmBorgError(f"domain '{name}': no plugin can freeze its disks")
    staging = settings.staging_dir / plan.uuid
    archive = metadata.archive_name(name, timestamp)
    notify(ctx.pm, "kvm_borg_before_snapshot", domain=name, disks=list(plan.disks), quiesce=plan.quiesce)
    release = None
    failure: BaseException | None = None
    try:
        freeze = source.freeze()
        result.consistency = freeze.consistency
        result.freeze_seconds = freeze.freeze_seconds
        result.warnings.extend(freeze.warnings)
        notify(ctx.pm, "kvm_borg_after_snapshot", domain=name, disks=freeze.disks, quiesced=freeze.quiesced,
               seconds=freeze.freeze_seconds)
        persistent = bool(handle.dom.isPersistent())
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        persistent_xml = handle.dom.XMLDesc(flags | libvirt.VIR_DOMAIN_XML_INACTIVE)
        live_xml = handle.dom.XMLDesc(flags) if plan.running else None
        lib_version, qemu_version = _versions(handle.connection.conn)
        meta = metadata.build_meta(
            plan, freeze, archive=archive, timestamp=timestamp, host=settings.hostname,
            libvirt_version=lib_version, qemu_version=qemu_version, persistent=persistent,
            staging_dir=str(staging), has_live_xml=live_xml is not None,
        )
        captured = host_state.capture(handle.connection.conn, plan.uuid, persistent_xml, live_xml,
                                      [d.source for d in plan.disks], str(staging))
        host_state.add_to_meta(meta, captured, {d.target: host_state.file_owner(d.source) for d in plan.disks})
        result.warnings.extend(f"domain '{name}': not in the archive: {piece}" for piece in captured.missing)
        metadata.write_staging(staging, meta, persistent_xml, live_xml, captured.staged)
        files = metadata.archive_files(meta, str(staging))
        request = ArchiveRequest(
            domain=name,
            archive_name=archive,
            timestamp=timestamp,
            files=tuple(files),
            block_devices=tuple(d.path for d in freeze.disks if d.is_block_device),
            comment=metadata.archive_comment(meta),
            total_bytes=sum(d.virtual_size for d in freeze.disks),
        )
        if hasattr(source, "mark_stage"):
            result.warnings.extend(filter(None, [source.mark_stage("storing")]))
        failpoints.reached("storing")
        result.stores = _store_all(ctx, name, backends, request)
    except BaseException as exc:  # remembered so a failing merge cannot replace an interrupt
        failure = exc
        raise
    finally:
        release = _merge_back(ctx, source, name, plan, staging, result, failure)
    if release.inconsistent and previous_timestamp is None and handle.dom.isActive():
        result.warnings.append(
            f"archive {archive} of domain '{name}' may be inconsistent (the domain started while its images "
            "were read); taking a live backup now"
        )
        log.warning("%s", result.warnings[-1])
        result.stores = []
        _backup_locked(ctx, handle, backends, excluded, result, previous_timestamp=timestamp)
        return
    failed = [s.repository for s in result.stores if not s.ok]
    result.ok = bool(result.stores) and not failed
    if failed:
        result.error = f"repository {', '.join(failed)} failed"


def backup_domain(ctx: Context, name: str, backends, cli_excluded: list[str]) -> DomainResult:
    """Given a domain name and the opened repositories, back it up; return its DomainResult.

    Every failure, of any type, is caught into the result (the run goes on with the next domain)
    except an interrupting signal, which propagates after the merge was attempted, even when the
    merge failed."""
    result = DomainResult(domain=name, ok=False)
    started = time.monotonic()
    stage = "plan"
    try:
        handle = handle_for(ctx.connection, name)
        excluded = ctx.settings.domains["disks_exclude"].get(name, []) + cli_excluded
        ensure_state_dir(ctx.settings)
        with domain_lock(ctx.settings.lock_dir, handle.uuid, name):
            stage = "backup"
            _backup_locked(ctx, handle, backends, excluded, result)
    except KvmBorgError as exc:
        result.ok = False
        result.error = str(exc)
        log.error("%s", exc)
        notify(ctx.pm, "kvm_borg_on_error", domain=name, stage=stage, error=exc)
    except libvirt.libvirtError as exc:
        result.ok = False
        result.error = f"domain '{name}': libvirt: {exc.get_error_message()}"
        log.error("%s", result.error)
        notify(ctx.pm, "kvm_borg_on_error", domain=name, stage=stage, error=exc)
    except Exception as exc:  # any other type too: reported for this domain, the run goes on
        result.ok = False
        result.error = f"domain '{name}': {_one_line(exc)}"
        log.error("%s", result.error)
        log.debug("traceback of the unexpected error", exc_info=True)  # shown with -vv
        notify(ctx.pm, "kvm_borg_on_error", domain=name, stage=stage, error=exc)
    finally:
        result.seconds = time.monotonic() - started
    return result


def run_backup(ctx: Context, names: list[str], all_domains: bool, repo_names: list[str] | None,
               cli_excluded: list[str]) -> RunSummary:
    """Given domain names (or --all), --repo names and --exclude-disk targets, back up every domain.

    Bad input (unknown domain or repository) raises before anything changes."""
    backends = open_repositories(ctx, repo_names)
    domains = resolve_domains(ctx, names, all_domains)
    check_disk_targets(ctx, domains, cli_excluded)
    summary = RunSummary()
    with signals.interruptible():
        try:
            for name in domains:
                summary.domains.append(backup_domain(ctx, name, backends, cli_excluded))
        except Interrupted:
            notify(ctx.pm, "kvm_borg_backup_finished", summary=summary)
            raise
    notify(ctx.pm, "kvm_borg_backup_finished", summary=summary)
    return summary


def add_arguments(subparsers) -> None:
    """Register `kvm-borg backup`."""
    parser = subparsers.add_parser("backup", help="back up domains")
    parser.add_argument("domains", nargs="*", metavar="DOMAIN")
    parser.add_argument("--all", action="store_true", help="every domain the config's `domains:` selects")
    parser.add_argument("--repo", action="append", metavar="NAME", help="only this repository (repeatable)")
    parser.add_argument("--exclude-disk", action="append", default=[], metavar="TARGET",
                        help="leave this disk target out (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a TTY")
    parser.set_defaults(run=run_from_args)


def print_summary(summary: RunSummary) -> None:
    """Print one block per domain: status, archives per repository, warnings."""
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


def run_from_args(ctx: Context, args) -> int:
    summary = run_backup(ctx, args.domains, args.all, args.repo, args.exclude_disk)
    print_json(summary.as_dict()) if args.json else print_summary(summary)
    return summary.exit_code
