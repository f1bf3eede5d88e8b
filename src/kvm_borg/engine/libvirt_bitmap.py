"""The bitmap engine: freeze a running domain with ONE libvirt pull-mode backup job that atomically
creates a new kvm-borg checkpoint, and show each disk as a directory of segment files (a FUSE view
over the job's NBD exports) whose attributes change only where the disk changed since the last run.
Release stops the view, ends the job, folds the new per-segment stamps into the state file and only
then deletes kvm-borg's older checkpoints. Registered by kvm_borg.default_plugins.libvirt_bitmap.

Every path after backupBegin ends the job: release() (safe after a partial freeze) or, after a
crash, `recover_bitmap_entry` from the journal entry written BEFORE backupBegin.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

from kvm_borg import failpoints, journal, method_choice, segment_state, segments
from kvm_borg.config import Settings
from kvm_borg.engine import backup_job, images
from kvm_borg.engine.connection import Connection
from kvm_borg.engine.libvirt_errors import translated, translating
from kvm_borg.engine.libvirt_snapshot import quiesce_decision, record_stage, resume_if_paused_by_io_error
from kvm_borg.engine.planning import DomainHandle, disk_qcow2_compat
from kvm_borg.errors import EngineError, KvmBorgError, RefusedError
from kvm_borg.models import DiskPlan, DiskReadStats, DomainPlan, FreezeResult, FrozenDisk, RecoveryReport, ReleaseResult

log = logging.getLogger(__name__)

SOURCE_NAME = "libvirt-bitmap"
SOCKET_NAME = "nbd.sock"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
# Where the socket goes when scratch_dir is too deep for one: a per-domain dir below it, QEMU's own.
SHORT_SOCKET_ROOT = Path("/run/kvm-borg-nbd")  # not below /run/kvm-borg: that is 0700, QEMU must reach it
NBD_CONNECTIONS = 2
DIRTY_FLAG = 1  # qemu:dirty-bitmap extents: bit 0 set = changed since the checkpoint


def recovery_command(name: str) -> str:
    return f"kvm-borg recover '{name}'"


# --- deciding (pure) ----------------------------------------------------------------------------


def no_bitmap_reason(driver_type: str, qcow2_compat: str | None, network: bool = False) -> str | None:
    """Given a disk's format, (qcow2) compat level and whether it is a network disk, return why it cannot
    carry a checkpoint bitmap (raw, qcow2 v2, a network qcow2 disk whose level kvm-borg cannot read...), or
    None when it can (qcow2 v3). Such a disk is `checkpoint='no'` and read in full every run."""
    kind = "network disk" if network else "disk"
    if driver_type != "qcow2":
        return f"{driver_type} {kind}: no bitmap"
    if network and qcow2_compat is None:
        return "qcow2 network disk of unknown compat level: no bitmap (kvm-borg reads the level of NBD exports only)"
    if not method_choice.holds_bitmaps(driver_type, qcow2_compat):
        return f"qcow2 image of compat {qcow2_compat or 'unknown'}: no bitmap (needs qcow2 v3)"
    return None


def full_read_reason(*, no_bitmap: str | None, full_requested: bool, state: segment_state.BitmapState | None,
                     checkpoint_problem: str | None, checkpoint_disks: set[str], previous: segments.DiskSegments | None,
                     target: str, virtual_size: int, segment_size: int, format: str, image: dict | None) -> str | None:
    """Given what is known about one disk this run (why it cannot carry a bitmap, whether --full was asked,
    the domain's previous state, what is wrong with its checkpoint, the targets that checkpoint has
    bitmaps for, the disk's previous segments, and its geometry and image identity now), return why
    every segment must be read this run, or None when the bitmap since the checkpoint may be used."""
    if no_bitmap:
        return no_bitmap
    if full_requested:
        return "--full requested"
    if state is None or state.checkpoint is None:
        return "no earlier bitmap backup"
    if previous is None:
        return "no earlier bitmap backup of this disk"
    if checkpoint_problem:
        return checkpoint_problem
    if target not in checkpoint_disks:
        return f"checkpoint {state.checkpoint} has no bitmap of this disk"
    return segments.full_read_reason(previous, virtual_size=virtual_size, segment_size=segment_size, format=format,
                                     image=image)


# Full reads that are no trouble: the first run, a deliberate --full. Every other reason (a checkpoint
# missing or unusable, an image replaced, a disk resized...) is also a warning: the sysadmin learns why a
# run took long (README: "what a lost bitmap costs").
EXPECTED_FULL_READS = ("--full requested", "no earlier bitmap backup", "no earlier bitmap backup of this disk",
                       "image changed since the last backup, and no checkpoint to say where")


def full_read_warning(domain: str, run: "DiskRun") -> str | None:
    """Given a domain name and one disk's DiskRun, return the warning its full read owes (trouble with its
    bitmap or its image), or None (incremental, clean, or an expected full read: see EXPECTED_FULL_READS,
    or a disk that can carry no bitmap)."""
    if run.reason is None or run.reason in EXPECTED_FULL_READS or run.reason == run.no_bitmap:
        return None
    return f"domain '{domain}': disk {run.target} is read in full this run: {run.reason}; a new chain starts"


@dataclass
class DiskRun:
    """One disk in this run: its plan, position, what its checkpoint carries and how it is read."""

    plan: DiskPlan
    index: int  # position in the plan: part of its segment inodes
    bitmap: bool  # the new checkpoint carries a bitmap for it
    reason: str | None  # full_read_reason (None: incremental from the state's checkpoint)
    virtual_size: int
    image: dict | None
    socket: str = ""  # the NBD export's unix socket (export name = target)
    dirty_context: str | None = None  # the NBD meta context of its dirty bitmap (None: full read or clean)
    clean: bool = False  # offline, layers unchanged since the last run: no segment changed
    layers: list | None = None  # offline: segment_state.layer_identity of its image layers
    no_bitmap: str | None = None  # why its image can carry no bitmap (raw, qcow2 v2), None when it can
    segments: segments.DiskSegments | None = None  # after the job began
    dirty: int = 0  # segments read this run
    changed: range | list = ()  # their indices

    @property
    def target(self) -> str:
        return self.plan.target


def image_identity(path: str) -> dict | None:
    """Given an image path, return its identity {"path", "dev", "ino"}, or None when it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return {"path": path, "dev": info.st_dev, "ino": info.st_ino}


def scratch_dir_of(settings: Settings) -> Path:
    """Given the settings, return the directory of the per-run scratch dirs (scratch_dir)."""
    return Path(settings.scratch_dir)


def view_mountpoint(settings: Settings, uuid: str) -> Path:
    """Given the settings and a domain UUID, return the view's mount point: a STABLE path (borg's files
    cache keys on it)."""
    return Path(settings.state_dir) / "view" / uuid


# --- the source ---------------------------------------------------------------------------------


class SegmentSource:
    """What both bitmap sources share: the run's dirs, the maps, the segment view, the results, the stage."""

    def __init__(self, handle: DomainHandle, plan: DomainPlan, settings: Settings):
        self.handle, self.plan, self.settings = handle, plan, settings
        self.entry: journal.Entry | None = None
        self.journal_written = False
        self.owner: str | None = None
        self.checkpoint: str | None = None
        self.run_dir: Path | None = None
        self.view = None
        self.new_state: segment_state.BitmapState | None = None

    def hand_over(self, owner: str) -> None:
        """Before freeze(): name `owner` in the journal entry; the view then outlives this process."""
        self.owner = owner

    def _prepare_scratch(self) -> tuple[Path, Path]:
        """Refuse (nothing changed yet) when scratch_dir lacks room; return (the run's scratch dir, the
        socket path: in it, or below SHORT_SOCKET_ROOT when that path would be too long for a socket)."""
        name = self.plan.name
        root = scratch_dir_of(self.settings)
        root.mkdir(mode=0o711, parents=True, exist_ok=True)  # QEMU must reach the run's directory
        free = shutil.disk_usage(root).free
        if free < self.settings.scratch_min_free:
            raise RefusedError(
                f"domain '{name}': only {free // 2**20} MiB free in {root} for scratch files, "
                f"{self.settings.scratch_min_free // 2**20} MiB required (scratch_min_free)")
        run_dir = root / self.plan.uuid
        socket = run_dir / SOCKET_NAME
        longest = max([SOCKET_NAME, *(f"{d.target}.sock" for d in self.plan.disks)], key=len)  # offline: one per disk
        if len(os.fsencode(str(run_dir / longest))) > SOCKET_PATH_MAX:
            socket = SHORT_SOCKET_ROOT / self.plan.uuid / SOCKET_NAME
        return run_dir, socket

    def _make_dirs(self, run_dir: Path, socket: Path, owner: tuple[int, int] | None) -> None:
        """Create the run's scratch dir (and the socket's, when elsewhere), private to `owner` (QEMU's user)."""
        dirs = [run_dir] if socket.parent == run_dir else [run_dir, socket.parent]
        if socket.parent != run_dir:
            SHORT_SOCKET_ROOT.mkdir(mode=0o711, parents=True, exist_ok=True)
        for directory in dirs:
            if directory.exists():  # left by a run that died before journaling: ours, by its name
                shutil.rmtree(directory)
            directory.mkdir(mode=0o700)
            if owner is not None:
                os.chown(directory, *owner)  # QEMU binds the socket and opens the scratch files in it

    def _read_maps(self, run: DiskRun, previous, stamp: int) -> None:
        """Read the disk's allocation (and, given a dirty context, dirty) map from its export; plan its
        segments: all read (full), the dirty ones, or none (clean)."""
        from kvm_borg import nbd_client

        size = self.settings.segment_size
        contexts = ["base:allocation"] + ([run.dirty_context] if run.dirty_context else [])
        handle = nbd_client.open_export(run.socket, run.target, contexts)
        try:
            export_size = nbd_client.size(handle)
            if export_size != run.virtual_size:
                raise KvmBorgError(f"disk {run.target}: export is {export_size} bytes, expected {run.virtual_size}")
            count = segments.segment_count(export_size, size)
            zero = segments.zero_segments(nbd_client.extents(handle, "base:allocation", export_size), size, count,
                                          export_size)
            dirty = None
            if run.clean:
                dirty = set()
            elif run.dirty_context:
                extents = nbd_client.extents(handle, run.dirty_context, export_size)
                dirty = segments.dirty_segments([(o, n, bool(f & DIRTY_FLAG)) for o, n, f in extents], size, count)
        finally:
            nbd_client.close(handle)
        run.segments = segments.plan_disk(previous, dirty=dirty, zero=zero, stamp=stamp, target=run.target,
                                          virtual_size=export_size, segment_size=size, format=run.plan.driver_type,
                                          image=run.image, layers=run.layers)
        run.dirty = count if dirty is None else len(dirty)
        run.changed = range(count) if dirty is None else sorted(dirty)

    def _start_view(self, runs: list[DiskRun], mountpoint: Path, stamp: int) -> None:
        from kvm_borg.segment_view import control, spec

        mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
        disks = tuple(spec.NbdDisk(
            target=r.target, socket=r.socket, export=r.target, virtual_size=r.segments.virtual_size,
            segment_size=r.segments.segment_size, chain=r.segments.chain, disk_index=r.index,
            stamps=r.segments.stamps, zero=bytes(r.segments.zero), manifest=segments.manifest(r.segments),
            connections=NBD_CONNECTIONS) for r in runs)
        view_spec = spec.ViewSpec(kind="nbd", mountpoint=str(mountpoint), disks=disks, now_ns=stamp + 1,
                                   run_stamp=stamp)
        spec_dir = self.run_dir / "view"
        spec_dir.mkdir(mode=0o700)
        self.view = control.start_view(view_spec, spec_dir / "spec.json", outlive_parent=self.owner is not None)
        self.entry.extra["view_pid"] = self.view.pid
        self.entry.stage = "view"
        journal.write_entry(self.settings.journal_dir, self.entry)

    def _frozen_disk(self, run: DiskRun, mountpoint: Path) -> FrozenDisk:
        return FrozenDisk(
            target=run.target, path=str(mountpoint / run.target), driver_type=run.plan.driver_type,
            virtual_size=run.segments.virtual_size, original_source=run.plan.source, layout="segments",
            segment_size=run.segments.segment_size, segment_count=run.segments.count)

    def _read_stats(self, run: DiskRun) -> DiskReadStats:
        expected = sum(run.segments.file_size(i) for i in run.changed)
        return DiskReadStats(target=run.target, bytes_read=expected, segments_dirty=run.dirty,
                             segments_total=run.segments.count, full_read_reason=run.reason)

    def mark_stage(self, stage: str) -> str | None:
        """Record `stage` in the journal entry once it is written (see record_stage); return the warning or None."""
        return record_stage(self.entry, self.settings, stage) if self.journal_written else None

    def _stop_view(self, report: RecoveryReport) -> dict[str, int]:
        if self.view is None:
            return {}
        try:
            return dict(self.view.stop().bytes_read)
        except KvmBorgError as exc:
            report.warn(f"stopping the segment view: {exc}")
            return {}

    def _save_pending(self, warnings: list[str]) -> None:
        """Write the new state as the run's pending state (segment_state.save_pending), so that `thaw` or
        `recover` can fold it when this process is not the one that ends the run (freeze --expose, a
        crash); a failure only costs the next run re-reading this run's changes: a warning."""
        try:
            segment_state.save_pending(self.settings.state_dir, self.new_state)
        except OSError as exc:
            warnings.append(f"domain '{self.plan.name}': could not write the pending bitmap state ({exc}); "
                            "if this run is not ended by this process, the next run reads its changes again")

    def _fold(self, report: RecoveryReport) -> str | None:
        """Save the new state (fsync'd) and drop the pending copy; return the checkpoint it names, None when
        there was none to save."""
        if self.new_state is None:
            return None
        try:
            segment_state.save(self.settings.state_dir, self.new_state)
            segment_state.discard_pending(self.settings.state_dir, self.plan.uuid)
        except (OSError, ValueError) as exc:
            report.warn(f"could not save the bitmap state ({exc}); the next run reads since the previous "
                        "checkpoint again")
            return None
        return self.new_state.checkpoint


class BitmapSource(SegmentSource):
    """A FrozenSource: one pull-mode backup job per run, disks shown as segment directories."""

    # -- freeze steps

    def _quiesce_decision(self, warnings: list[str]) -> bool:
        return quiesce_decision(self.handle.dom, self.plan, self.settings, warnings, "backup")

    def _decide(self, state: segment_state.BitmapState | None) -> list[DiskRun]:
        dom = self.handle.dom
        problem, bitmap_disks = None, set()
        if state is not None and state.checkpoint and not self.plan.full_read:
            problem = backup_job.checkpoint_problem(dom, state.checkpoint)
            if problem is None:
                bitmap_disks = backup_job.checkpoint_bitmap_disks(backup_job.checkpoint_description(dom, state.checkpoint))
        runs = []
        for index, disk in enumerate(self.plan.disks):
            compat = disk_qcow2_compat(disk) if disk.driver_type == "qcow2" else None
            no_bitmap = no_bitmap_reason(disk.driver_type, compat, network=disk.network is not None)
            virtual_size = int(dom.blockInfo(disk.target, 0)[0])
            image = image_identity(disk.source) if disk.network is None else None  # a network disk: no file
            previous = state.disks.get(disk.target) if state is not None else None
            reason = full_read_reason(
                no_bitmap=no_bitmap, full_requested=self.plan.full_read, state=state, checkpoint_problem=problem,
                checkpoint_disks=bitmap_disks, previous=previous, target=disk.target, virtual_size=virtual_size,
                segment_size=self.settings.segment_size, format=disk.driver_type, image=image)
            runs.append(DiskRun(disk, index, no_bitmap is None, reason, virtual_size, image, no_bitmap=no_bitmap))
        return runs

    @translating
    def freeze(self) -> FreezeResult:
        """Decide per disk (incremental or full read and why), journal the run, start the backup job
        (quiesced with fsFreeze/fsThaw around it when the guest agent answers), read the dirty and
        allocation maps, start the segment view; return the disks as segment directories."""
        name, dom, settings = self.plan.name, self.handle.dom, self.settings
        warnings: list[str] = []
        quiesce = self._quiesce_decision(warnings)
        run_dir, socket = self._prepare_scratch()
        state = segment_state.load(settings.state_dir, self.plan.uuid)
        runs = self._decide(state)
        warnings.extend(filter(None, (full_read_warning(name, run) for run in runs)))
        owner = backup_job.qemu_owner(dom)
        mountpoint = view_mountpoint(settings, self.plan.uuid)
        self.checkpoint = backup_job.new_checkpoint_name(time.time()) if any(r.bitmap for r in runs) else None
        self.entry = journal.Entry(
            domain=name, uuid=self.plan.uuid, disks=[], source=SOURCE_NAME, owner=self.owner,
            extra={"checkpoint": self.checkpoint, "previous_checkpoint": state.checkpoint if state else None,
                   "scratch_dir": str(run_dir), "socket": str(socket), "mountpoint": str(mountpoint),
                   "view_pid": None})
        journal.write_entry(settings.journal_dir, self.entry)  # BEFORE anything changes
        self.journal_written = True
        self.run_dir = run_dir
        failpoints.reached("journal-written")
        self._make_dirs(run_dir, socket, owner)
        backup = backup_job.backup_xml(str(socket), [
            (r.target, str(run_dir / f"{r.target}.scratch"), None if r.reason else state.checkpoint) for r in runs])
        checkpoint = backup_job.checkpoint_xml(self.checkpoint, [(r.target, "bitmap" if r.bitmap else "no")
                                                                 for r in runs]) if self.checkpoint else None
        now_ns = time.time_ns()
        started = time.monotonic()
        quiesced = self._begin(backup, checkpoint, quiesce, warnings)
        freeze_seconds = time.monotonic() - started
        self.entry.stage = "job"
        journal.write_entry(settings.journal_dir, self.entry)
        failpoints.reached("job-begun")
        stamp = segments.run_stamp(now_ns, state.disks.values() if state else ())
        for run in runs:
            run.socket = str(socket)
            run.dirty_context = None if run.reason else f"qemu:dirty-bitmap:backup-{run.target}"
            self._read_maps(run, state.disks.get(run.target) if state else None, stamp)
        self.new_state = segment_state.BitmapState(self.checkpoint, {r.target: r.segments for r in runs},
                                                   self.plan.uuid)
        self._save_pending(warnings)
        self._start_view(runs, mountpoint, stamp)
        for warning in warnings:
            log.warning(warning)
        return FreezeResult(
            disks=[self._frozen_disk(r, mountpoint) for r in runs],
            quiesced=quiesced,
            consistency="quiesced" if quiesced else "crash-consistent",
            freeze_seconds=freeze_seconds,
            warnings=warnings,
            method="bitmap",
            read_stats=[self._read_stats(r) for r in runs],
            bytes_served=self.view.bytes_served,
        )

    def _begin(self, backup: str, checkpoint: str | None, quiesce: bool, warnings: list[str]) -> bool:
        """Start the job, between fsFreeze and fsThaw when quiescing; return whether the guest was quiesced."""
        name, dom = self.plan.name, self.handle.dom
        frozen = False
        if quiesce:
            try:
                dom.fsFreeze(None, 0)
                frozen = True
            except libvirt.libvirtError as exc:
                if self.plan.quiesce == "required":
                    raise KvmBorgError(f"domain '{name}': guest file systems could not be frozen: "
                                       f"{exc.get_error_message()}") from None
                warnings.append(f"domain '{name}': freezing the guest file systems failed "
                                f"({exc.get_error_message()}), backup is crash-consistent")
        try:
            backup_job.begin(dom, backup, checkpoint)
        except EngineError as exc:
            raise KvmBorgError(f"domain '{name}': backup job could not start: {exc}") from None
        finally:
            if frozen:
                try:
                    dom.fsThaw(None, 0)
                except libvirt.libvirtError as exc:
                    warnings.append(f"domain '{name}': thawing the guest file systems failed: "
                                    f"{exc.get_error_message()}")
        return frozen

    def release(self) -> ReleaseResult:
        """Stop the view, end the job, fold the new stamps into the state file, delete kvm-borg's older
        checkpoints, remove the scratch dir and drop the journal entry; safe after a partial freeze.
        When the job cannot be ended the entry is kept and a warning names `kvm-borg recover`."""
        if not self.journal_written:
            return ReleaseResult()
        started = time.monotonic()
        report = RecoveryReport(self.plan.name)
        stage_warning = self.mark_stage("releasing")
        failpoints.reached("release")
        bytes_read = self._stop_view(report)
        finish(self.entry, self.handle.connection, self.settings, report, fold=lambda: self._fold(report))
        warnings = ([stage_warning] if stage_warning else []) + report.warnings
        return ReleaseResult(warnings=warnings, seconds=time.monotonic() - started, bytes_read=bytes_read)


def offline_bitmap_problem(top_info: dict, name: str) -> str | None:
    """Given `qemu-img info` of a qcow2 image (its top entry) and a checkpoint name, return why the image's
    persistent bitmap of that name cannot be exported (missing, in use: not closed cleanly), or None."""
    bitmaps = ((top_info.get("format-specific") or {}).get("data") or {}).get("bitmaps") or []
    found = next((b for b in bitmaps if isinstance(b, dict) and b.get("name") == name), None)
    if found is None:
        return f"the image has no bitmap of checkpoint {name}"
    flags = found.get("flags") or []
    if "in-use" in flags:
        return f"bitmap of checkpoint {name} unusable (the image was not closed cleanly)"
    return None


def offline_disk_mode(*, full_requested: bool, state: segment_state.BitmapState | None,
                      previous: segments.DiskSegments | None, geometry_reason: str | None, layers: list | None,
                      bitmap_problem: str | None) -> tuple[str, str | None]:
    """Given what is known about one disk of a shut-off domain, return how to read it and why:
    ("clean", None) when its image layers are unchanged since the last (offline) run, ("bitmap", None)
    when the state's checkpoint bitmap in the image says what changed, else ("full", reason)."""
    if full_requested:
        return "full", "--full requested"
    if state is None or previous is None:
        return "full", "no earlier bitmap backup" if state is None else "no earlier bitmap backup of this disk"
    if geometry_reason:
        return "full", geometry_reason
    if layers is not None and previous.layers == layers:
        return "clean", None
    if state.checkpoint and bitmap_problem is None:
        return "bitmap", None
    return "full", bitmap_problem or "image changed since the last backup, and no checkpoint to say where"


class OfflineBitmapSource(SegmentSource):
    """A FrozenSource for a shut-off domain planned with the bitmap method: each disk exported read-only
    by qemu-nbd and shown as segments like a running one. A disk whose image layers are unchanged since
    the last run (identity, size, ctime of every layer, recorded after an offline run) is clean; else
    the state's checkpoint bitmap in the image (cleanly closed) gives the changes; else a full read. No
    checkpoint is created (libvirt cannot, offline); the state keeps naming the previous one, whose
    bitmap still records every later change. If the domain starts meanwhile, the result is flagged
    inconsistent and nothing is folded (the pipeline then backs it up live)."""

    def __init__(self, handle: DomainHandle, plan: DomainPlan, settings: Settings):
        super().__init__(handle, plan, settings)
        self.exports: list = []  # the qemu-nbd processes
        self.started_during_backup = False
        self._callback_id = None

    def _on_lifecycle(self, _conn, dom, event, _detail, _opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED and dom.UUIDString() == self.plan.uuid:
            self.started_during_backup = True

    def _decide(self, state) -> list[DiskRun]:
        runs = []
        for index, disk in enumerate(self.plan.disks):
            info = images.backing_chain(disk.source, disk.driver_type)
            virtual_size = int(info[0]["virtual-size"])
            image = image_identity(disk.source)
            previous = state.disks.get(disk.target) if state is not None else None
            try:
                layers = segment_state.layer_identity([disk.source, *(e["filename"] for e in info[1:])])
            except (OSError, KeyError):
                layers = None
            geometry = segments.full_read_reason(previous, virtual_size=virtual_size,
                                                 segment_size=self.settings.segment_size, format=disk.driver_type,
                                                 image=image) if previous is not None else None
            problem = no_bitmap = None
            if state is not None and state.checkpoint:
                no_bitmap = no_bitmap_reason(disk.driver_type, images.qcow2_compat(disk.source))
                problem = no_bitmap or offline_bitmap_problem(info[0], state.checkpoint)
            mode, reason = offline_disk_mode(full_requested=self.plan.full_read, state=state, previous=previous,
                                             geometry_reason=geometry, layers=layers, bitmap_problem=problem)
            run = DiskRun(disk, index, False, reason, virtual_size, image, clean=mode == "clean", layers=layers,
                          no_bitmap=no_bitmap)
            run.dirty_context = f"qemu:dirty-bitmap:{state.checkpoint}" if mode == "bitmap" else None
            runs.append(run)
        return runs

    @translating
    def freeze(self) -> FreezeResult:
        """Watch for a start, decide per disk (clean, bitmap or full), journal the run, export every disk
        with qemu-nbd, read the maps, start the segment view; return the disks as segment directories."""
        from kvm_borg.engine import qemu_nbd

        name, settings = self.plan.name, self.settings
        conn = self.handle.connection.conn
        self._callback_id = conn.domainEventRegisterAny(
            self.handle.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        if self.handle.dom.isActive():
            self.started_during_backup = True
        run_dir, socket = self._prepare_scratch()
        state = segment_state.load(settings.state_dir, self.plan.uuid)
        runs = self._decide(state)
        warnings = [w for w in (full_read_warning(name, run) for run in runs) if w]
        for warning in warnings:
            log.warning(warning)
        mountpoint = view_mountpoint(settings, self.plan.uuid)
        self.checkpoint = state.checkpoint if state is not None else None
        for run in runs:
            run.socket = str(socket.parent / f"{run.target}.sock")
        self.entry = journal.Entry(
            domain=name, uuid=self.plan.uuid, disks=[], source=SOURCE_NAME, owner=self.owner, stage="planned",
            extra={"checkpoint": None, "previous_checkpoint": self.checkpoint, "scratch_dir": str(run_dir),
                   "socket": str(socket), "mountpoint": str(mountpoint), "view_pid": None, "exports": []})
        journal.write_entry(settings.journal_dir, self.entry)  # BEFORE anything starts
        self.journal_written = True
        self.run_dir = run_dir
        self._make_dirs(run_dir, socket, None)
        now_ns = time.time_ns()
        for run in runs:
            argv = qemu_nbd.qemu_nbd_argv(
                run.plan.source, run.plan.driver_type, run.socket, run.target,
                bitmap=self.checkpoint if run.dirty_context else None, connections=NBD_CONNECTIONS + 2,
                block_device=images.is_block_device(run.plan.source))
            process = qemu_nbd.start(argv, run.socket, run_dir / f"{run.target}.qemu-nbd.log",
                                     outlive_parent=self.owner is not None)
            self.exports.append(process)
            self.entry.extra["exports"].append({"pid": process.pid, "socket": run.socket})
        self.entry.stage = "exported"
        journal.write_entry(settings.journal_dir, self.entry)
        stamp = segments.run_stamp(now_ns, state.disks.values() if state else ())
        for run in runs:
            self._read_maps(run, state.disks.get(run.target) if state else None, stamp)
        self.new_state = segment_state.BitmapState(self.checkpoint, {r.target: r.segments for r in runs},
                                                   self.plan.uuid)
        self._start_view(runs, mountpoint, stamp)
        return FreezeResult(disks=[self._frozen_disk(r, mountpoint) for r in runs], quiesced=False,
                            consistency="offline", method="bitmap", read_stats=[self._read_stats(r) for r in runs],
                            warnings=warnings,
                            bytes_served=self.view.bytes_served)

    def release(self) -> ReleaseResult:
        """Stop the view and the exports, fold the new state unless the domain started meanwhile, remove
        the scratch dir and drop the journal entry; say whether the domain started."""
        from kvm_borg.engine import qemu_nbd

        if self._callback_id is not None:
            try:
                self.handle.connection.conn.domainEventDeregisterAny(self._callback_id)
            except libvirt.libvirtError:
                pass
            self._callback_id = None
        if not self.journal_written:
            return ReleaseResult()
        started = time.monotonic()
        report = RecoveryReport(self.plan.name)
        stage_warning = self.mark_stage("releasing")
        bytes_read = self._stop_view(report)
        for process in self.exports:
            qemu_nbd.stop(process)
        try:
            inconsistent = self.started_during_backup or bool(self.handle.dom.isActive())
        except libvirt.libvirtError:
            inconsistent = True
        if inconsistent:
            report.warn(f"domain '{self.plan.name}' started while its images were read")
        finish(self.entry, self.handle.connection, self.settings, report,
               fold=None if inconsistent else (lambda: self._fold(report)))
        warnings = ([stage_warning] if stage_warning else []) + report.warnings
        return ReleaseResult(warnings=warnings, inconsistent=inconsistent, seconds=time.monotonic() - started,
                             bytes_read=bytes_read)


# --- ending a run: release and recover ----------------------------------------------------------


def finish(entry: journal.Entry, connection: Connection, settings: Settings, report: RecoveryReport,
           fold=None) -> None:
    """Given a bitmap journal entry and, from release, `fold` (a callable that saves the run's new state and
    returns the checkpoint it names, None when not saved), end what the run left: stop a leftover view
    and qemu-nbd exports, end the backup job, resume a guest a full scratch_dir paused, fold, delete the
    entry's checkpoint unless the state names it (or else every older kvm-borg checkpoint), remove the
    scratch dir and drop the entry. The entry is kept (with a warning naming `kvm-borg recover`), and
    nothing folded, only when the job could not be ended."""
    extra = entry.extra
    mountpoint, pid = extra.get("mountpoint"), extra.get("view_pid")
    if mountpoint:
        try:
            from kvm_borg.segment_view import control

            control.stop_leftover(mountpoint, pid if isinstance(pid, int) else None)
        except (KvmBorgError, OSError) as exc:
            report.warn(f"could not stop the segment view at {mountpoint}: {exc}")
    for export in extra.get("exports") or []:
        from kvm_borg.engine import qemu_nbd

        if isinstance(export, dict) and isinstance(export.get("pid"), int) and \
                qemu_nbd.stop_leftover(export["pid"], str(export.get("socket"))):
            report.did(f"stopped the qemu-nbd export at {export.get('socket')}")
    dom = connection.lookup_uuid(entry.uuid)
    if dom is not None:
        try:
            if backup_job.abort(dom):
                report.did("ended the backup job")
        except EngineError as exc:
            report.warn(f"could not end the backup job ({exc}); the journal entry is kept: run "
                        f"`{recovery_command(entry.domain)}`")
            return
        try:
            # Measured on QEMU 7.2: while the job runs, a guest write whose old data cannot be copied to a
            # full scratch_dir fails with ENOSPC (copy-before-write), pausing a guest with the default error
            # policy; once the job is over the retried write succeeds.
            resume_if_paused_by_io_error(dom, report, "scratch_dir full?); resumed it now that the backup job "
                                                      "is over")
        except libvirt.libvirtError as exc:
            report.warn(f"could not resume the guest paused by a write error: {exc.get_error_message()}")
    folded = fold() if fold is not None else None  # after the job ended, before any checkpoint goes
    _tidy_checkpoints(dom, entry, settings, report, folded)
    scratch, socket = extra.get("scratch_dir"), extra.get("socket")
    socket_dir = os.path.dirname(socket) if socket else None
    if socket_dir != scratch and os.path.dirname(socket_dir or "") != str(SHORT_SOCKET_ROOT):
        socket_dir = None  # only ever our own directories
    for directory in {scratch, socket_dir} - {None, ""}:
        if os.path.lexists(directory):
            shutil.rmtree(directory, ignore_errors=True)
            if os.path.lexists(directory):
                report.warn(f"could not remove the scratch dir {directory}")
            else:
                report.did(f"removed the scratch dir {directory}")
    if mountpoint:
        try:
            os.rmdir(mountpoint)
        except OSError:
            pass
    try:
        journal.remove_entry(settings.journal_dir, entry.uuid)
    except OSError as exc:
        report.warn(f"could not remove the journal entry ({exc}): run `{recovery_command(entry.domain)}`")


def _tidy_checkpoints(dom, entry: journal.Entry, settings: Settings, report: RecoveryReport, folded: str | None) -> None:
    """Delete the entry's checkpoint when the state does not name it; when it does, delete kvm-borg's
    older ones (the previous state's bitmap covers everything until the fold is durable)."""
    if dom is None:
        return
    created = entry.extra.get("checkpoint")
    current = folded
    if current is None:
        state = segment_state.load(settings.state_dir, entry.uuid)
        current = state.checkpoint if state is not None else None
    try:
        if current is not None and current == created:
            doomed = [n for n in backup_job.own_checkpoints(dom) if n != current]
        else:
            doomed = [created] if created else []
        for name in doomed:
            done = backup_job.delete_checkpoint(dom, name)
            if done is not None:
                report.did(f"checkpoint {name}: {done}")
    except EngineError as exc:
        report.warn(f"could not delete a kvm-borg checkpoint ({exc}); the next run deletes it")


def recover_bitmap_entry(entry: journal.Entry, connection: Connection, settings: Settings) -> RecoveryReport:
    """Given a journal entry of this source, complete it after a crash: stop a leftover view, end a
    leftover job, fold the pending state of a run handed over to an outside reader (freeze --expose), else
    delete the checkpoint the run created unless the state file names it (then it is the current one and
    the older ones go), remove the scratch dir, drop the entry. Idempotent."""
    report = RecoveryReport(entry.domain)
    if connection.reconnect_if_dead():
        report.warn("the connection to libvirtd was lost (libvirtd restarted?); reconnected")
    handed_over = entry.owner is not None and entry.stage == "exposed"
    with translated():
        finish(entry, connection, settings, report,
               fold=(lambda: fold_pending(entry, settings, report)) if handed_over else None)
    if not handed_over:
        segment_state.discard_pending(settings.state_dir, entry.uuid)
    return report


def fold_pending(entry: journal.Entry, settings: Settings, report: RecoveryReport) -> str | None:
    """Given the journal entry of a run whose disks were handed over and exposed (`freeze --expose`, ended by
    `thaw` or by `recover`), fold the pending state it left and return the checkpoint it names; None when
    there is none (then the run's checkpoint is deleted). A crashed `backup` is not folded: its checkpoint
    goes and the next run reads its changes again, so `segments_dirty` keeps counting them (folding would
    be as correct: every repository's files cache or parent then differs on those segments' stamps)."""
    try:
        state = segment_state.fold_pending(settings.state_dir, entry.uuid, entry.extra.get("checkpoint"))
    except (OSError, ValueError) as exc:
        report.warn(f"could not fold the pending bitmap state ({exc}); the next run reads this run's changes again")
        return None
    if state is None:
        return None
    report.did(f"folded the bitmap state of checkpoint {state.checkpoint}")
    return state.checkpoint
