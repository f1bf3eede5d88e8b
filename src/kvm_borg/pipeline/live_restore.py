"""`kvm-borg restore --live`: the domain runs from the archive within seconds, then its data is pulled in.

Order of work: choose and read the archive, plan it like a restore (kvm_borg.restore_plan: a
copy or a domain not defined here, never over local images) and refuse before anything changes
(kvm_borg.restore_refusals, kvm_borg.live_restore_plan.check_live_disk) → journal entry (source
"live-restore") → expose the archive read-only to QEMU (kvm_borg.pipeline.archive_mount: the
backend's mount, a `files` segment view for segmented disks, in a directory only root and QEMU's
user may enter) → write NVRAM, TPM state and the XML file like a restore → create each disk's
local qcow2 image, backed by the exposed archived image → define and start the domain, its disks'
read and write errors pausing the guest → pull every disk's data into its local image, one after the other (libvirt
blockPull, kvm_borg.engine.live_pull) → the disks have no backing file: withdraw the exposure and
drop the entry.

Anything that fails before the domain runs removes what this live restore made. From the moment it
runs, the domain is never stopped and the journal entry stays until the pull is done: a failed
pull, a mount that died, a signal or a SIGKILL leave it to `kvm-borg recover`, which re-exposes the
archive at the same paths when its mount is gone (then restarts QEMU through a managed save, so the
images are opened again), resumes a guest paused on a read error and finishes the pull
(`recover_live_restore`). While the entry exists, prune refuses the repository (kvm_borg.pipeline.prune).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvm_borg import journal, live_restore_plan, restore_plan, signals
from kvm_borg.engine import lifecycle, live_pull
from kvm_borg.errors import EngineError, KvmBorgError, RefusedError, UsageError
from kvm_borg.journal import Entry, JournalDisk
from kvm_borg.live_restore_plan import SOURCE_NAME, check_live_disk, live_domain_xml, local_image, overlay_argv
from kvm_borg.locks import domain_lock
from kvm_borg.models import RecoveryReport, RepositoryBackend
from kvm_borg.pipeline import archive as archive_reading
from kvm_borg.pipeline import archive_mount
from kvm_borg.pipeline.archive_mount import MountRecord
from kvm_borg.pipeline.backup import prepare_state_dir
from kvm_borg.pipeline.restore import (
    RestoreOptions,
    local_disks,
    restored_xml,
    sanitized_xml,
    write_files,
)
from kvm_borg.progress import transfer_progress
from kvm_borg.restore_files import make_dirs
from kvm_borg.restore_refusals import check_refusals, unfinished_journal_entry
from kvm_borg.tools import tool_output

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25


@dataclass
class LiveRestoreResult:
    domain: str
    archive: str
    repository: str
    disks: dict[str, str]
    xml: str | None
    uuid: str
    nvram: str | None = None
    tpm: str | None = None
    warnings: list[str] = field(default_factory=list)
    running_after_seconds: float = 0.0
    seconds: float = 0.0
    drill: dict | None = None  # what the drill callback found (verify --boot --live)
    backings: dict[str, str] = field(default_factory=dict)  # {target: the exposed archived image}

    def as_dict(self) -> dict:
        return {
            "domain": self.domain, "archive": self.archive, "repository": self.repository, "disks": self.disks,
            "xml": self.xml, "uuid": self.uuid, "nvram": self.nvram, "tpm": self.tpm, "defined": True,
            "started": True, "live": True, "warnings": self.warnings,
            "running_after_seconds": round(self.running_after_seconds, 3), "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class ExposurePaths:
    """Where one live restore exposes its archive: `directory` (root and QEMU's user only) holds the
    backend's mount (`archive`) and the segment view (`images`); `record` is its MountRecord, `work` the
    view's spec directory."""

    directory: str
    record: str
    work: str

    @property
    def archive(self) -> str:
        return os.path.join(self.directory, "archive")

    @property
    def images(self) -> str:
        return os.path.join(self.directory, "images")


def exposure_paths(state_dir: Path, uuid: str) -> ExposurePaths:
    """Given the state dir and the restored domain's UUID, return where its archive is exposed."""
    root = Path(state_dir) / "live"
    return ExposurePaths(str(root / uuid), str(root / f"{uuid}.json"), str(root / f"{uuid}.work"))


def check_live_options(options: RestoreOptions) -> None:
    """Refuse options a live restore does not take (UsageError) before anything is read."""
    if options.disks or options.to is not None:
        raise UsageError("--live restores the whole domain: it takes no --disk or --to")
    if options.overwrite:
        raise UsageError("--live never replaces files or domains: it takes no --overwrite")


# --- the live restore --------------------------------------------------------------------------


def run_live_restore(settings, conn, repo: dict, backend: RepositoryBackend, options: RestoreOptions, *,
                     bandwidth: int = 0, on_started=None, before_start=None, drill=None) -> LiveRestoreResult:
    """Given the Settings, a libvirt connection, the repository (config entry and backend), RestoreOptions
    (passed by check_live_options), a pull bandwidth per disk in bytes/s (0: unlimited) and a callback
    `on_started(result)` called once the domain runs, restore the domain live; return the result once the
    pull is done. A refusal changes nothing; a failure after the start leaves the domain running and the
    journal entry for `kvm-borg recover` (KvmBorgError saying so).

    The restore drill (`verify --boot --live`) also gives `before_start(defined_xml, result)`, which raises to
    keep the defined copy from starting (it is then undone like any failure before the start), and
    `drill(dom, result, advance_pull)`, called once the copy runs: it waits for what it wants while calling
    `advance_pull()` now and then (which starts each disk's pull in turn and returns whether all are done)
    and returns its findings (result.drill); then the copy is discarded whatever happened: the pull
    stopped, the domain destroyed and undefined, its files and the exposure removed, the entry dropped
    (result.warnings names what could not be removed; a SIGKILL leaves the entry, and `recover` discards
    the copy)."""
    try:
        return _run_live_restore(settings, conn, repo, backend, options, bandwidth, on_started, before_start, drill)
    except EngineError as exc:
        raise KvmBorgError(f"live restore failed: {exc}") from None


def _run_live_restore(settings, conn, repo, backend, options, bandwidth, on_started, before_start,
                      drill) -> LiveRestoreResult:
    started_at = time.monotonic()
    chosen = archive_reading.choose(backend, settings, options.domain, options.archive, options.host)
    archive = chosen.name
    read = archive_reading.read_archive_files(backend, archive, options.domain)  # meta.json + XMLs: one call
    meta, entries = read.meta, read.entries
    archive_reading.check_meta_host(meta, chosen, archive)
    target_dir = os.path.abspath(options.target_dir) if options.target_dir else None
    local = local_disks(conn, meta["domain"]["name"]) if target_dir is None else None
    plan = restore_plan.plan_restore(meta, frozenset(entries), target_dir=target_dir, new_name=options.name,
                                     local_disks=local, archive_types=entries)
    if plan.in_place:
        raise RefusedError(f"domain {plan.domain!r} is defined here: --live restores a copy (--name NEW) and never "
                           "writes over its images")
    formats = {disk.target: check_live_disk(disk) for disk in plan.disks}
    live_plan = replace(plan, disks=[replace(d, format="qcow2", image=replace(d.image, destination=local_image(
        d.image.destination))) for d in plan.disks])
    if unfinished_journal_entry(settings.journal_dir, plan.domain, [plan.uuid]):
        raise RefusedError(f"domain {plan.domain!r} has an unfinished entry in the journal; run "
                           f"'kvm-borg recover {plan.domain}' first")
    archived_xml, xml_text = restored_xml(backend, archive, meta, entries, live_plan, options, small=read.small)
    xml_text, sanitize_warnings = sanitized_xml(conn, xml_text, live_plan, isolate=options.isolate,
                                                scratch_dir=target_dir if options.isolate else None)
    check_refusals(conn, live_plan, live_plan.destinations(), define=True, overwrite=False)
    check_free_space(live_plan)
    paths = exposure_paths(settings.state_dir, plan.uuid)
    if os.path.lexists(paths.directory) or os.path.lexists(paths.record):
        raise RefusedError(f"{paths.directory} exists: an earlier live restore of UUID {plan.uuid} left it")
    qemu = live_pull.qemu_ids(conn)

    result = LiveRestoreResult(domain=plan.domain, archive=archive, repository=repo["name"], disks={},
                               xml=plan.xml_path, uuid=plan.uuid,
                               warnings=list(chosen.warnings) + list(plan.warnings) + sanitize_warnings)
    prepare_state_dir(settings)
    with domain_lock(settings.lock_dir, plan.uuid, plan.domain):
        entry = Entry(domain=plan.domain, uuid=plan.uuid, source=SOURCE_NAME, stage="exposing", disks=[
            JournalDisk(d.target, base="", base_type="file", base_format=formats[d.target],
                        overlay=d.image.destination) for d in live_plan.disks],
            extra={"repository": repo["name"], "archive": archive, "original": plan.original_name, "record": paths.record,
                   "directory": paths.directory, "created": live_plan.destinations(),
                   "qemu_uid": qemu[0] if qemu else None, **({"drill": True} if drill is not None else {})})
        journal.write_entry(settings.journal_dir, entry)
        dom = None
        try:
            backings = expose(backend, repo["name"], archive, plan, paths, qemu)
            for disk in entry.disks:
                disk.base = backings[disk.target]
            result.backings = dict(backings)
            journal.write_entry(settings.journal_dir, entry)
            files = replace(live_plan, disks=[])  # NVRAM, TPM state, the XML file: as a restore writes them
            written = _Written()
            write_files(backend, archive, files, xml_text, written)
            result.nvram, result.tpm = written.nvram, written.tpm
            for disk in live_plan.disks:
                make_dirs(os.path.dirname(disk.image.destination))
                tool_output(overlay_argv(disk.image.destination, backings[disk.target], formats[disk.target],
                                         disk.virtual_size), what=f"create the local image of {disk.target}")
                os.chmod(disk.image.destination, 0o600)
                result.disks[disk.target] = disk.image.destination
            entry.stage = "defining"
            journal.write_entry(settings.journal_dir, entry)
            dom = lifecycle.define(conn, live_domain_xml(xml_text, {t: (backings[t], formats[t]) for t in backings}))
            if before_start is not None:
                before_start(lifecycle.inactive_xml(conn, plan.domain) or "", result)
            lifecycle.start(dom)
        except BaseException:
            with signals.shielded():  # a second signal must not cut the cleanup short
                _abandon(settings, conn, entry, backend, defined=dom is not None)
            raise
        entry.stage = "pulling"
        journal.write_entry(settings.journal_dir, entry)
        result.running_after_seconds = time.monotonic() - started_at
        log.info("domain '%s' runs from archive %s after %.1fs; pulling its disks in", plan.domain, archive,
                 result.running_after_seconds)
        if on_started is not None:
            on_started(result)
        if drill is not None:
            try:
                result.drill = drill(dom, result, lambda: advance_pull(dom, set(backings), bandwidth))
            finally:
                with signals.shielded():
                    result.warnings += _abandon(settings, conn, entry, backend, defined=True)
            result.seconds = time.monotonic() - started_at
            return result
        try:
            pull_in(dom, set(backings), bandwidth=bandwidth, progress=settings.progress)
        except BaseException as exc:
            reason = str(exc) or type(exc).__name__
            raise KvmBorgError(f"domain {plan.domain!r}: the pull did not finish ({reason}); the domain keeps running "
                               f"from the archive: run 'kvm-borg recover {plan.domain}' to finish it") from None
        problems = finish(settings, conn, dom, entry, backend)
        result.warnings += problems
    result.seconds = time.monotonic() - started_at
    return result


def _existing_ancestor(directory: str) -> str:
    """Given a directory that may not exist yet, return it or its nearest existing ancestor."""
    path = os.path.abspath(directory)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


def _filesystem_of(directory: str) -> tuple[int, str]:
    """Given a directory (perhaps not made yet), return (the st_dev of the file system it will be on, it)."""
    return os.stat(_existing_ancestor(directory)).st_dev, directory


def check_free_space(plan) -> None:
    """Given the live restore's plan (disks on their local images), refuse it (RefusedError) when a file system
    the local images go to has less free space than they take once pulled (sizes from meta.json, checked by
    archive_meta): without it the pull would run out of space and pause the guest (error_policy stop)."""
    needs = live_restore_plan.space_needed({d.image.destination: d.virtual_size for d in plan.disks},
                                           _filesystem_of)
    free = {}
    for key, (shown, _needed) in needs.items():
        free[key] = shutil.disk_usage(_existing_ancestor(shown)).free
    refusal = live_restore_plan.space_refusal(needs, free)
    if refusal is not None:
        raise RefusedError(refusal)


class _Written:
    """What restore's write_files reports back (only what a live restore needs of a RestoreResult)."""

    def __init__(self):
        self.disks, self.formats, self.bytes_written = {}, {}, 0
        self.nvram = self.tpm = None


def expose(backend: RepositoryBackend, repository: str, archive: str, plan, paths: ExposurePaths,
           qemu: tuple[int, int] | None) -> dict[str, str]:
    """Given a backend, the archive, the plan and where to expose it, mount the archive (and a segment view of
    its segmented disks) readable by QEMU's user only; return {target: the archived image's path}. On a
    failure what was mounted is torn down again."""
    os.makedirs(os.path.dirname(paths.directory), mode=0o711, exist_ok=True)
    os.chmod(os.path.dirname(paths.directory), 0o711)
    os.mkdir(paths.directory, 0o700)
    if qemu is not None:  # QEMU's user only (root passes anyway): not its group, which may hold people
        os.chown(paths.directory, qemu[0], 0)
        os.chmod(paths.directory, 0o500)
    os.makedirs(paths.work, mode=0o700, exist_ok=True)
    record = MountRecord.create(Path(paths.record), paths.directory, paths.work)
    record.add(kind="dir", path=paths.directory)
    try:
        root = archive_mount.mount_archive(record, backend, repository, archive, paths.archive, shared=True)
        segmented = [d for d in plan.disks if d.segmented]
        images = archive_mount.segment_view(record, paths.images, paths.work, root, segmented, shared=True)
        for disk in plan.disks:
            if not disk.segmented:
                images[disk.target] = archive_mount.archive_image(root, disk.image.archive_path, disk.format,
                                                                  f"disk {disk.target}")
        record.data["complete"] = True
        record.save()
        return images
    except BaseException:
        for problem in archive_mount.teardown(record, lambda _repo, path: backend.unmount(path)):
            log.error("cleanup after the failed exposure: %s", problem)
        raise


def pull_in(dom, targets: set[str], *, bandwidth: int = 0, progress: bool = False, poll: float = POLL_SECONDS) -> None:
    """Given a running domain and disk targets, pull each one's backing data into its image, one disk after
    the other (QEMU 7.2 crashed when two pulls of one domain completed together), a job already running
    on a disk kept (its bandwidth lifted when `bandwidth` is 0), at most `bandwidth` bytes/s (0:
    unlimited), with a progress bar on a terminal when `progress`; return when no target has a backing file
    left. A KvmBorgError when a pull ends before it is done, the guest is paused on a disk error or the
    domain stops."""
    finished = 0
    with transfer_progress("pulling", None, enabled=progress) as update:
        for target in sorted(targets):
            if target not in live_pull.backed_targets(dom):
                continue
            state = live_pull.pull_progress(dom, target)
            if state is None:
                live_pull.start_pull(dom, target, bandwidth)
            elif not bandwidth:
                live_pull.set_pull_speed(dom, target, 0)
            size = 0
            while True:
                state = live_pull.pull_progress(dom, target)
                if state is None:
                    if target in live_pull.backed_targets(dom):
                        raise KvmBorgError(f"the pull of disk {target} ended before it was done")
                    break
                size = state[1]
                update(finished + state[0])
                if not live_pull.is_active(dom):
                    raise KvmBorgError("the domain stopped")
                if live_pull.paused_by_io_error(dom):
                    raise KvmBorgError("the guest is paused: a read from the archive failed")
                time.sleep(poll)
            finished += size
            update(finished)


def advance_pull(dom, targets: set[str], bandwidth: int = 0) -> bool:
    """Given a running domain, its disk targets and a bandwidth per disk in bytes/s (0: unlimited), keep one
    pull going: start the next disk's pull (sorted) when none runs; return whether no target has a backing
    file left. A KvmBorgError when the domain stopped or the guest is paused on a disk error."""
    if not live_pull.is_active(dom):
        raise KvmBorgError("the domain stopped")
    if live_pull.paused_by_io_error(dom):
        raise KvmBorgError("the guest is paused: a read from the archive failed")
    backed = live_pull.backed_targets(dom) & targets
    for target in sorted(backed):
        if live_pull.pull_progress(dom, target) is not None:
            return False
    if backed:
        live_pull.start_pull(dom, min(backed), bandwidth)
        return False
    return True


def finish(settings, conn, dom, entry: Entry, backend: RepositoryBackend) -> list[str]:
    """Given a domain whose pull is done, make sure its persistent definition has no backing file left,
    withdraw the exposure and drop the journal entry; return the problems (the entry then stays)."""
    targets = {disk.target for disk in entry.disks}
    # The image headers say "no backing file" now, but the pulled clusters' qcow2 metadata may still be in
    # QEMU's cache: flush it before the archive goes away.
    if live_pull.is_active(dom) and not live_pull.flush_disks(dom):
        log.warning("domain '%s' is not running: its pulled data reach the images with QEMU's next flush",
                    entry.domain)
    inactive = lifecycle.inactive_xml(conn, entry.domain)
    if inactive is not None and live_restore_plan.targets_with_backing(inactive) & targets:
        lifecycle.define(conn, live_restore_plan.without_backing(inactive, targets))
    problems = withdraw(entry, backend)
    if problems:
        return [f"the exposure of the archive is not fully withdrawn ({problems[0]}); run "
                f"'kvm-borg recover {entry.domain}'"]
    journal.remove_entry(settings.journal_dir, entry.uuid)
    return []


def withdraw(entry: Entry, backend: RepositoryBackend) -> list[str]:
    """Given a live restore's entry, tear its exposure down; return the problems left."""
    record = MountRecord.load(Path(entry.extra["record"]))
    if record is None:
        return []
    return archive_mount.teardown(record, lambda _repo, path: backend.unmount(path))


def _abandon(settings, conn, entry: Entry, backend: RepositoryBackend, *, defined: bool) -> list[str]:
    """Undo a live restore that failed before its domain ran (or a drill's copy): destroy and undefine the
    domain it defined, remove every file it created and its exposure, drop the entry (kept when the exposure
    cannot be withdrawn); return the problems (also logged)."""
    problems = []
    if defined:
        dom = lifecycle.lookup(conn, entry.domain)
        if dom is not None and dom.UUIDString() == entry.uuid:
            problems += lifecycle.remove(conn, entry.domain)
    for path in entry.extra.get("created", []):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove {path}: {exc.strerror}")
    exposure = withdraw(entry, backend)
    for problem in problems + exposure:
        log.error("cleanup of the live restore: %s (run 'kvm-borg recover %s')", problem, entry.domain)
    if not exposure:
        journal.remove_entry(settings.journal_dir, entry.uuid)
    return problems + exposure


# --- recovery ----------------------------------------------------------------------------------


def _backend_for(settings, name: str) -> RepositoryBackend:
    """Given the Settings and a repository name from a journal entry, return its backend."""
    from kvm_borg.config import select_repositories
    from kvm_borg.plugins import make_plugin_manager

    try:
        repo = select_repositories(settings, [name])[0]
    except KvmBorgError:
        raise KvmBorgError(f"repository {name!r} of the live restore is no longer configured") from None
    backend = make_plugin_manager(settings.plugins).hook.kvm_borg_repository_backend(repository=repo,
                                                                                    settings=settings)
    if backend is None:
        raise KvmBorgError(f"repository {name!r}: no plugin handles its type")
    return backend


def _exposure_alive(entry: Entry) -> bool:
    """Given a live restore's entry, return whether every archived image it names can be read."""
    for disk in entry.disks:
        if not disk.base:
            return False
        try:
            fd = os.open(disk.base, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            os.pread(fd, 4096, 0)
        except OSError:
            return False
        finally:
            os.close(fd)
    return True


def _reexpose(settings, conn, entry: Entry, backend: RepositoryBackend, report: RecoveryReport) -> None:
    """Tear down what is left of the exposure and expose the archive again at the same paths."""
    problems = withdraw(entry, backend)
    if problems:
        raise KvmBorgError(f"domain {entry.domain!r}: the dead exposure of the archive cannot be removed "
                           f"({problems[0]})")
    chosen_meta, entries = archive_reading.read_archive(backend, entry.extra["archive"], entry.extra.get("original"))
    paths = exposure_paths(settings.state_dir, entry.uuid)
    plan = restore_plan.plan_restore(chosen_meta, frozenset(entries), target_dir="/", with_xml=False,
                                     archive_types=entries, disks=[d.target for d in entry.disks])
    qemu = live_pull.qemu_ids(conn)
    images = expose(backend, entry.extra["repository"], entry.extra["archive"], plan, paths, qemu)
    for disk in entry.disks:
        if images.get(disk.target) != disk.base:
            raise KvmBorgError(f"domain {entry.domain!r}: disk {disk.target} is exposed at {images.get(disk.target)}, "
                               f"not at {disk.base} as its image expects")
    report.did(f"exposed archive {entry.extra['archive']} again at {paths.directory}")


def recover_live_restore(entry: Entry, connection, settings) -> RecoveryReport:
    """Given a live restore's journal entry, the engine Connection and the Settings, complete it: a domain
    that never ran is undone (its files, its definition, the exposure); a running one gets its exposure
    back (QEMU restarted through a managed save when the old mount died), is resumed when a read error
    paused it, and its pull is finished; a shut-off one is flattened offline. Return the RecoveryReport."""
    report = RecoveryReport(entry.domain)
    conn = connection.conn
    backend = _backend_for(settings, entry.extra["repository"])
    dom = lifecycle.lookup(conn, entry.domain)
    if dom is not None and dom.UUIDString() != entry.uuid:
        dom = None
    try:
        if dom is None or entry.stage in ("exposing", "defining") and not live_pull.is_active(dom):
            _abandon(settings, conn, entry, backend, defined=dom is not None)
            report.did("the live restore had not started the domain: its files and the exposure are removed")
            return report
        if entry.extra.get("drill"):
            problems = _abandon(settings, conn, entry, backend, defined=True)
            if problems:
                raise KvmBorgError(f"domain {entry.domain!r}: {problems[0]}")
            report.did("removed the restore drill's copy, its files and the exposure of the archive")
            return report
        if not _exposure_alive(entry):
            _reexpose(settings, conn, entry, backend, report)
            if live_pull.is_active(dom):
                paused = live_pull.paused_by_io_error(dom)
                live_pull.restart_process(dom)
                report.did("restarted QEMU through a managed save so it opens the archive again")
                if paused:
                    live_pull.resume(dom)
                    report.did("resumed the guest paused on a read error")
        if not live_pull.is_active(dom):
            _flatten_offline(conn, entry, report)
        else:
            if live_pull.paused_by_io_error(dom):
                live_pull.resume(dom)
                report.did("resumed the guest paused on a read error")
            targets = live_pull.backed_targets(dom) & {d.target for d in entry.disks}
            pull_in(dom, targets)
            if targets:
                report.did(f"pulled {', '.join(sorted(targets))} in")
        problems = finish(settings, conn, dom, entry, backend)
    except EngineError as exc:
        raise KvmBorgError(f"domain {entry.domain!r}: {exc}") from None
    if problems:
        raise KvmBorgError(problems[0])
    report.did("the live restore is complete: no backing file, the archive is no longer exposed")
    return report


def _flatten_offline(conn, entry: Entry, report: RecoveryReport) -> None:
    """Given a shut-off domain of a live restore, copy the archived data into each local image (qemu-img
    rebase onto nothing) and drop the backing stores from its definition."""
    for disk in entry.disks:
        tool_output(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", disk.overlay],
                    what=f"copy the archived data of {disk.target} into {disk.overlay}", timeout=None)
    inactive = lifecycle.inactive_xml(conn, entry.domain)
    if inactive is not None:
        lifecycle.define(conn, live_restore_plan.without_backing(inactive, {d.target for d in entry.disks}))
    report.did(f"the domain is shut off: copied the archived data into {', '.join(d.overlay for d in entry.disks)}")
