"""The snapshot engine: freeze a running domain with one atomic external disk-only snapshot and merge
the overlays back with active blockcommit + pivot; recover what an interrupted run left behind.
Registered as a plugin by kvm_borg.default_plugins.libvirt_snapshot.

The same routine, `bring_back_to_base`, releases a normal backup and completes a journal entry
after a crash, so the recovery path runs on every backup.
"""

from __future__ import annotations

import logging
import os
import time

import libvirt

from kvm_borg import failpoints, journal
from kvm_borg.config import Settings
from kvm_borg.engine import images
from kvm_borg.engine.connection import Connection
from kvm_borg.engine.libvirt_errors import translating
from kvm_borg.engine.lifecycle import agent_command
from kvm_borg.engine.domain_xml import (
    disk_targets,
    has_guest_agent_channel,
    parse_disks,
    rewrite_disk_source,
    snapshot_xml,
    sources_by_target,
)
from kvm_borg.engine.planning import DomainHandle
from kvm_borg.errors import CommitError, EngineError, KvmBorgError, RefusedError
from kvm_borg.execute import duration_text
from kvm_borg.models import DomainPlan, FreezeResult, FrozenDisk, RecoveryReport, ReleaseResult

log = logging.getLogger(__name__)

SOURCE_NAME = "libvirt-snapshot"
SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
)
COMMIT_FLAGS = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
# libvirt errors worth another attempt: a job not ready yet, a busy state lock, a passing failure.
TRANSIENT_ERRORS = {
    libvirt.VIR_ERR_BLOCK_COPY_ACTIVE,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_OPERATION_INVALID,
    libvirt.VIR_ERR_OPERATION_FAILED,
    libvirt.VIR_ERR_INTERNAL_ERROR,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
}


def recovery_command(name: str) -> str:
    return f"kvm-borg recover '{name}'"


# --- freezing --------------------------------------------------------------------------------


def guest_agent_answers(dom: libvirt.virDomain, timeout: float) -> bool:
    """Given a running domain, return whether its QEMU guest agent answers a ping within `timeout` s."""
    try:
        agent_command(dom, "guest-ping", timeout=timeout)
        return True
    except EngineError as exc:
        log.debug("guest agent of %s does not answer: %s", dom.name(), exc)
        return False


def quiesce_decision(dom: libvirt.virDomain, plan, settings, warnings: list[str], what: str) -> bool:
    """Given a running domain, its DomainPlan (`quiesce`: auto | required | off), the Settings, the list to
    add warnings to and what is taken ("snapshot", "backup"), return whether to quiesce it through the
    guest agent: never with `off`; with `auto` when the agent answers (else a warning, or a log line
    when the domain has no agent channel); with `required` RefusedError unless it answers."""
    name = plan.name
    if plan.quiesce == "off":
        return False
    has_channel = has_guest_agent_channel(dom.XMLDesc(0))
    quiesce = has_channel and guest_agent_answers(dom, settings.guest_agent_timeout)
    if not quiesce and plan.quiesce == "required":
        raise RefusedError(f"domain '{name}': quiesce is required but the guest agent does not answer")
    if not quiesce and has_channel:
        warnings.append(f"domain '{name}': guest agent not answering, {what} is crash-consistent")
    elif not quiesce:
        log.info("domain '%s' has no guest agent channel: crash-consistent %s", name, what)
    return quiesce


def frozen_disk(plan_disk, path: str) -> FrozenDisk:
    """Given a DiskPlan and the path to read, return a FrozenDisk with its size and backing chain."""
    block = images.is_block_device(path)
    info = images.backing_chain(path, plan_disk.driver_type)
    chain = tuple(entry["filename"] for entry in info[1:])
    return FrozenDisk(
        target=plan_disk.target,
        path=path,
        driver_type=plan_disk.driver_type,
        virtual_size=int(info[0]["virtual-size"]),
        original_source=plan_disk.source,
        backing_chain=chain,
        is_block_device=block,
        backing_formats=tuple(str(entry.get("format") or "") for entry in info[1:]),
    )


def journal_entry_for(plan: DomainPlan) -> journal.Entry:
    """Given a running domain's plan, return the journal Entry that names its overlays."""
    return journal.Entry(
        domain=plan.name,
        uuid=plan.uuid,
        source=SOURCE_NAME,
        disks=[
            journal.JournalDisk(
                target=d.target,
                base=d.source,
                base_type=d.source_type,
                base_format=d.driver_type,
                overlay=plan.overlays[d.target],
            )
            for d in plan.disks
        ],
    )


def record_stage(entry: journal.Entry, settings: Settings, stage: str) -> str | None:
    """Given a written journal entry, record `stage` in it, best-effort: the stage is informational
    (recover re-reads the domain's real state), so a failed write (ENOSPC in state_dir...) is logged
    and returned as a warning, never raised. Return that warning, or None."""
    entry.stage = stage
    try:
        journal.write_entry(settings.journal_dir, entry)
    except OSError as exc:
        warning = f"domain '{entry.domain}': could not record stage {stage!r} in the journal ({exc})"
        log.warning("%s", warning)
        return warning
    return None


class SnapshotSource:
    """A FrozenSource: freeze a running domain's disks on overlays; release = commit them back."""

    def __init__(self, handle: DomainHandle, plan: DomainPlan, settings: Settings):
        self.handle, self.plan, self.settings = handle, plan, settings
        self.entry = journal_entry_for(plan)
        self.journal_written = False

    def _create_snapshot(self, quiesce: bool) -> None:
        xml = snapshot_xml(
            f"kvm-borg-{int(time.time())}", disk_targets(self.handle.dom.XMLDesc(0)), self.plan.overlays
        )
        flags = SNAPSHOT_FLAGS | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE if quiesce else 0)
        self.handle.dom.snapshotCreateXML(xml, flags)

    def _remove_unused_overlays(self) -> None:
        """After a failed snapshot: delete overlay files libvirt may have left, if not in use."""
        live = sources_by_target(self.handle.dom.XMLDesc(0))
        for target, overlay in self.plan.overlays.items():
            if live.get(target) != overlay and os.path.exists(overlay):
                os.unlink(overlay)

    @translating
    def freeze(self) -> FreezeResult:
        """Write the journal entry, then take one atomic snapshot of all planned disks."""
        name, dom = self.plan.name, self.handle.dom
        warnings: list[str] = []
        # decided first: a refusal must not even touch the journal
        quiesce = quiesce_decision(dom, self.plan, self.settings, warnings, "snapshot")
        journal.write_entry(self.settings.journal_dir, self.entry)  # BEFORE anything changes
        self.journal_written = True
        failpoints.reached("journal-written")
        started = time.monotonic()
        try:
            self._create_snapshot(quiesce)
        except libvirt.libvirtError as exc:
            self._remove_unused_overlays()
            if not quiesce or self.plan.quiesce == "required":
                raise KvmBorgError(f"domain '{name}': snapshot failed: {exc.get_error_message()}") from None
            warnings.append(
                f"domain '{name}': quiesced snapshot failed ({exc.get_error_message()}), "
                "took a crash-consistent one"
            )
            quiesce = False
            try:
                self._create_snapshot(False)
            except libvirt.libvirtError as retry_exc:
                self._remove_unused_overlays()
                raise KvmBorgError(
                    f"domain '{name}': snapshot failed: {retry_exc.get_error_message()} (the quiesced attempt "
                    "failed too)"
                ) from None
        freeze_seconds = time.monotonic() - started
        self.entry.stage = "snapshot"
        journal.write_entry(self.settings.journal_dir, self.entry)
        failpoints.reached("snapshot-taken")
        live = sources_by_target(dom.XMLDesc(0))
        for target, overlay in self.plan.overlays.items():
            if live.get(target) != overlay:
                raise KvmBorgError(f"domain '{name}': disk {target} is not on its overlay after the snapshot")
        for warning in warnings:
            log.warning(warning)
        disks = [frozen_disk(d, d.source) for d in self.plan.disks]
        return FreezeResult(
            disks=disks,
            quiesced=quiesce,
            consistency="quiesced" if quiesce else "crash-consistent",
            freeze_seconds=freeze_seconds,
            warnings=warnings,
        )

    def mark_stage(self, stage: str) -> str | None:
        """Record `stage` in the journal entry once it is written (see record_stage); return the warning or None."""
        return record_stage(self.entry, self.settings, stage) if self.journal_written else None

    def hand_over(self, owner: str) -> None:
        """Before freeze(): name `owner` in the journal entry, so whoever completes it (`kvm-borg thaw`,
        `kvm-borg recover`) lets that owner finish with the frozen files first."""
        self.entry.owner = owner

    def release(self) -> ReleaseResult:
        """Merge every overlay back and clear the journal; CommitError names the recovery command.

        Nothing before the merge may raise: the stage write is best-effort."""
        if not self.journal_written:
            return ReleaseResult()
        started = time.monotonic()
        stage_warning = self.mark_stage("committing")
        failpoints.reached("release")
        report = bring_back_to_base(self.entry, self.handle.connection, self.settings)
        warnings = ([stage_warning] if stage_warning else []) + report.warnings
        return ReleaseResult(warnings=warnings, seconds=time.monotonic() - started)


class OfflineSource:
    """A FrozenSource for a shut-off domain: its images do not change, read them directly. If the domain
    starts while they are read, the result is flagged inconsistent (the backup pipeline then retries it
    live). It journals nothing unless handed over: then an entry without disks names the domain and
    its owner, so `kvm-borg recover` and `thaw` find what the owner holds."""

    def __init__(self, handle: DomainHandle, plan: DomainPlan, settings: Settings):
        self.handle, self.plan, self.settings = handle, plan, settings
        self.started_during_backup = False
        self._callback_id = None
        self.entry: journal.Entry | None = None
        self.journal_written = False

    def _on_lifecycle(self, _conn, dom, event, _detail, _opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED and dom.UUIDString() == self.plan.uuid:
            self.started_during_backup = True

    def hand_over(self, owner: str) -> None:
        """Before freeze(): journal the domain for `owner` when it freezes (an entry without disks)."""
        self.entry = journal.Entry(domain=self.plan.name, uuid=self.plan.uuid, disks=[], source=SOURCE_NAME,
                                   owner=owner, stage="frozen")

    @translating
    def freeze(self) -> FreezeResult:
        """Watch the domain's lifecycle events (a start means inconsistent), journal it if handed over,
        and return its images as the FrozenDisks."""
        conn = self.handle.connection.conn
        self._callback_id = conn.domainEventRegisterAny(
            self.handle.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
        )
        if self.handle.dom.isActive():
            self.started_during_backup = True
        if self.entry is not None:
            journal.write_entry(self.settings.journal_dir, self.entry)
            self.journal_written = True
        return FreezeResult(
            disks=[frozen_disk(d, d.source) for d in self.plan.disks], quiesced=False, consistency="offline"
        )

    def mark_stage(self, stage: str) -> str | None:
        """Record `stage` in the journal entry if it was handed over (see record_stage); else nothing, None."""
        return record_stage(self.entry, self.settings, stage) if self.journal_written else None

    @translating
    def release(self) -> ReleaseResult:
        """Stop watching, drop the journal entry if one was written, and say whether the domain started."""
        if self._callback_id is not None:
            try:
                self.handle.connection.conn.domainEventDeregisterAny(self._callback_id)
            except libvirt.libvirtError:
                pass
        if self.journal_written:
            journal.remove_entry(self.settings.journal_dir, self.plan.uuid)
        inconsistent = self.started_during_backup or bool(self.handle.dom.isActive())
        warnings = [f"domain '{self.plan.name}' started while its images were read"] if inconsistent else []
        return ReleaseResult(warnings=warnings, inconsistent=inconsistent)


# --- merging back and recovery ----------------------------------------------------------------


def _same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _remove_overlay(path: str, report: RecoveryReport) -> None:
    if os.path.lexists(path):
        os.unlink(path)
        report.did(f"removed overlay {path}")


def _save(entry: journal.Entry, settings: Settings, report: RecoveryReport) -> None:
    """Record the entry's progress, best-effort: a journal that cannot be written (state_dir full)
    must not stop the merge of the remaining disks; recover re-reads the real state anyway."""
    try:
        journal.write_entry(settings.journal_dir, entry)
    except OSError as exc:
        report.warn(f"could not update the journal entry ({exc}); merging on")


def wait_until_ready(connection: Connection, dom: libvirt.virDomain, target: str, timeout: float) -> None:
    """Wait for the commit job of `target` to be READY (event or libvirt's mirror flag), bounded."""
    uuid = dom.UUIDString()
    deadline = time.monotonic() + timeout
    while True:
        event = connection.block_jobs.wait(uuid, target, lambda e: e is not None, 1.0)
        if event is not None and event.status == "ready":
            return
        if event is not None and event.status in ("failed", "canceled"):
            connection.block_jobs.forget(uuid, target)
            raise KvmBorgError(f"commit of disk {target} {event.status}")
        disk = next((d for d in parse_disks(dom.XMLDesc(0)) if d.target == target), None)
        if disk is not None and disk.mirror_ready:
            return
        if not dom.blockJobInfo(target, 0):
            raise KvmBorgError(f"commit job of disk {target} vanished before it was ready")
        if time.monotonic() > deadline:
            raise KvmBorgError(f"commit of disk {target} not ready after {timeout:.0f}s (commit_timeout)")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, libvirt.libvirtError):
        return (exc.get_error_code() in TRANSIENT_ERRORS or exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR
                or exc.get_error_domain() == libvirt.VIR_FROM_RPC)
    return isinstance(exc, KvmBorgError) and not isinstance(exc, CommitError)


def commit_live_disk(connection: Connection, dom, entry, disk, settings: Settings, report: RecoveryReport,
                     deadline: float | None = None) -> None:
    """Given a running domain and one journal disk, make the domain run on its base again.

    Idempotent: starts the active commit unless one runs, waits for READY (until `deadline`, a
    time.monotonic() value; None: commit_timeout from now), pivots, records the pivot in the
    journal, deletes the overlay."""
    live = sources_by_target(dom.XMLDesc(0))
    current = live.get(disk.target)
    if _same_file(current, disk.base) or current == disk.base:
        if not disk.committed:
            disk.committed = True
            _save(entry, settings, report)
        _remove_overlay(disk.overlay, report)
        return
    if current != disk.overlay:
        raise CommitError(
            f"disk {disk.target} runs on {current}, neither its base {disk.base} nor overlay {disk.overlay}"
        )
    job = dom.blockJobInfo(disk.target, 0)
    if job and job.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT:
        raise CommitError(f"disk {disk.target} has a foreign block job (type {job.get('type')})")
    if not job:
        connection.block_jobs.forget(dom.UUIDString(), disk.target)
        dom.blockCommit(disk.target, None, None, 0, COMMIT_FLAGS)
        report.did(f"started blockcommit of {disk.target}")
    timeout = settings.commit_timeout if deadline is None else max(0.0, deadline - time.monotonic())
    wait_until_ready(connection, dom, disk.target, timeout)
    failpoints.reached("commit-ready")
    dom.blockJobAbort(disk.target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    current = sources_by_target(dom.XMLDesc(0)).get(disk.target)
    if not (current == disk.base or _same_file(current, disk.base)):
        raise KvmBorgError(f"disk {disk.target} points at {current} after the pivot, not {disk.base}")
    failpoints.reached("pivoted")
    disk.committed = True
    _save(entry, settings, report)
    report.did(f"pivoted {disk.target} back to {disk.base}")
    _remove_overlay(disk.overlay, report)


def commit_offline_disk(dom, entry, disk, settings: Settings, report: RecoveryReport) -> None:
    """Given a shut-off (or vanished) domain and one journal disk, merge the overlay with qemu-img.

    The overlay is committed only when it may hold writes the base lacks: the persistent
    definition still points at it (or the domain is gone) and no pivot was recorded."""
    defined = sources_by_target(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) if dom is not None else {}
    on_overlay = defined.get(disk.target) == disk.overlay
    exists = os.path.exists(disk.overlay)
    if exists and not disk.committed and (on_overlay or dom is None):
        chain = images.backing_chain(disk.overlay, "qcow2")
        backing = chain[1]["filename"] if len(chain) > 1 else None
        if not _same_file(backing, disk.base):
            raise CommitError(f"overlay {disk.overlay} is backed by {backing}, not {disk.base}; not merging")
        images.commit_offline(disk.overlay)
        report.did(f"merged {disk.overlay} into {disk.base} (qemu-img commit)")
    elif on_overlay and not exists and not disk.committed:
        report.warn(
            f"overlay {disk.overlay} of disk {disk.target} is missing (deleted by hand?): writes made while "
            "the domain ran on it are lost; pointing the disk back at its base"
        )
    disk.committed = True
    _save(entry, settings, report)
    _remove_overlay(disk.overlay, report)


def fix_persistent_definition(connection: Connection, dom, entry, report: RecoveryReport) -> None:
    """Point the persistent definition of every journal disk that names its overlay back at the base."""
    if dom is None or not dom.isPersistent():
        return
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    defined = sources_by_target(xml)
    changed = False
    for disk in entry.disks:
        if defined.get(disk.target) == disk.overlay:
            xml = rewrite_disk_source(xml, disk.target, disk.base, disk.base_type, disk.base_format)
            changed = True
    if changed:
        connection.conn.defineXML(xml)
        report.did("pointed the persistent definition back at the base images")


def resume_if_paused_by_io_error(dom, report: RecoveryReport,
                                 why: str = "overlay file system full?); resumed it on its own images") -> None:
    """Resume a guest QEMU paused on a write error, now that the cause is gone and the failed write is
    retried: by default an overlay's full file system (the guest runs on its base again); the bitmap
    method passes its own `why` (the rest of the warning) for a full scratch_dir. A guest paused by anyone
    else stays paused."""
    if dom is None or not dom.isActive():
        return
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
        dom.resume()
        report.warn(f"the guest had been paused by a write error ({why}")


def bring_back_to_base(entry: journal.Entry, connection: Connection, settings: Settings) -> RecoveryReport:
    """Given a journal Entry, leave its domain on its own images, delete the overlays, drop the entry.

    Re-reads the domain's state on every attempt (it may stop, or libvirtd restart, meanwhile);
    retries transient libvirt errors with tenacity; raises CommitError with the recovery command.
    `commit_timeout` bounds the whole merge, retries and their waits included."""
    report = RecoveryReport(entry.domain)
    deadline = time.monotonic() + settings.commit_timeout

    def attempt():
        failpoints.reached("merge-attempt")
        if connection.reconnect_if_dead():
            report.warn("the connection to libvirtd was lost (libvirtd restarted?); reconnected")
        dom = connection.lookup_uuid(entry.uuid)
        for disk in entry.disks:
            if dom is not None and dom.isActive():
                commit_live_disk(connection, dom, entry, disk, settings, report, deadline)
            else:
                commit_offline_disk(dom, entry, disk, settings, report)
        fix_persistent_definition(connection, dom, entry, report)
        resume_if_paused_by_io_error(dom, report)

    import tenacity  # late: only a merge needs it (~30-70 ms of start-up otherwise)

    backoff = tenacity.wait_exponential(multiplier=1, max=30)
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(settings.commit_retries)
        | tenacity.stop_after_delay(max(0.0, deadline - time.monotonic())),
        wait=lambda state: max(0.0, min(backoff(state), deadline - time.monotonic())),
        retry=tenacity.retry_if_exception(_is_transient),
        before_sleep=lambda state: report.warn(
            f"merge attempt {state.attempt_number} failed ({_describe(state.outcome.exception())}), retrying"
        ),
        reraise=True,
    )
    try:
        retrying(attempt)
    except (libvirt.libvirtError, KvmBorgError, OSError) as exc:
        limit = (f" within commit_timeout {duration_text(settings.commit_timeout)}"
                 if time.monotonic() >= deadline else "")
        raise CommitError(
            f"domain '{entry.domain}': could not merge overlays back{limit} ({_describe(exc)}); the journal "
            f"entry is kept: run `{recovery_command(entry.domain)}`"
        ) from None
    try:
        journal.remove_entry(settings.journal_dir, entry.uuid)
    except OSError as exc:  # merged all the same; the stale entry is harmless to recover
        report.warn(f"merged back, but could not remove the journal entry ({exc}): run "
                    f"`{recovery_command(entry.domain)}`")
    return report


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, libvirt.libvirtError):
        return exc.get_error_message()
    return str(exc)
