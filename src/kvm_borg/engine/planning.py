"""Decide what a backup of one domain will do, and refuse unsafe states before anything changes."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass

import libvirt

from kvm_borg import journal, method_choice
from kvm_borg.config import Settings
from kvm_borg.engine.backup_job import is_own_checkpoint
from kvm_borg.engine.connection import Connection
from kvm_borg.engine.domain_xml import choose_disks, is_overlay_path, network_image_url, overlay_path
from kvm_borg.engine.images import qcow2_compat, qemu_img_argv
from kvm_borg.engine.libvirt_errors import translating
from kvm_borg.engine.versions import backup_api_problem
from kvm_borg.errors import KvmBorgError, RefusedError
from kvm_borg.tools import tool_output
from kvm_borg.models import DiskPlan, DomainPlan, SkippedDisk

log = logging.getLogger(__name__)


@dataclass
class DomainHandle:
    """A libvirt domain as the steps and plugins see it."""

    name: str
    uuid: str
    dom: libvirt.virDomain
    connection: Connection


@translating
def handle_for(connection: Connection, name: str) -> DomainHandle:
    """Given a connection and a domain name, return its DomainHandle (KvmBorgError if missing, EngineError
    if libvirt fails)."""
    dom = connection.lookup(name)
    return DomainHandle(dom.name(), dom.UUIDString(), dom, connection)


def overlay_fallback_dir(settings: Settings) -> str:
    """Return the directory for overlays of block-device disks when `overlay_dir` is unset."""
    return str(settings.state_dir / "overlays")


_BITMAP_PROBLEMS: dict[str, str | None] = {}  # per libvirt URI, asked once per process


def bitmap_problem(connection: Connection) -> str | None:
    """Given a connection, return why the bitmap method cannot run on this host (a module missing in
    kvm-borg's Python, libvirt without backup jobs), or None when it can; asked once per URI."""
    if connection.uri not in _BITMAP_PROBLEMS:
        problems = [*method_choice.missing_bitmap_modules(), backup_api_problem(connection.conn)]
        _BITMAP_PROBLEMS[connection.uri] = "; ".join(p for p in problems if p) or None
    return _BITMAP_PROBLEMS[connection.uri]


# qemu-img asking a network server for a qcow2 header: a server that takes one client at a time (qemu-nbd's
# default --shared=1, QEMU being that client) never answers, and an unknown level only costs a full read.
NETWORK_PROBE_TIMEOUT = 15.0


def network_qcow2_compat_argv(url: str) -> list[str]:
    """Given a network disk's URL (domain_xml.network_image_url), return the `qemu-img info` argv reading its
    qcow2 header only (force-shared, no backing file opened)."""
    return qemu_img_argv("info", "-U", "--output=json", "-f", "qcow2", url)


def disk_qcow2_compat(disk: DiskPlan) -> str | None:
    """Given a qcow2 DiskPlan, return its compat level ("1.1", "0.10"), or None when unknown: a network disk
    is asked through its URL where domain_xml.network_image_url builds one (NBD; at most
    NETWORK_PROBE_TIMEOUT seconds), else not at all."""
    if disk.network is None:
        return qcow2_compat(disk.source)
    url = network_image_url(disk.network)
    if url is None:
        return None
    try:
        info = json.loads(tool_output(network_qcow2_compat_argv(url), what=f"read the qcow2 header of {url}",
                                      timeout=NETWORK_PROBE_TIMEOUT))
    except (KvmBorgError, ValueError) as exc:
        log.info("disk %s: qcow2 level of %s unknown (%s): read in full", disk.target, url, exc)
        return None
    compat = ((info.get("format-specific") or {}).get("data") or {}).get("compat") if isinstance(info, dict) else None
    return compat if isinstance(compat, str) else None


def choose_method(settings: Settings, name: str, running: bool, disks, connection: Connection | None = None) -> str:
    """Given the settings, a domain's name, whether it runs, its chosen DiskPlans and the connection, return
    its method: "snapshot" or "bitmap" (kvm_borg.method_choice; qcow2 compat levels are read only for
    `auto`; a network disk makes `auto` choose bitmap for a running domain). `auto` falls back to snapshot,
    with an info line, where the bitmap method cannot run here."""
    auto = method_choice.configured_method(settings.method, settings.domains_method, name) == "auto"
    network = any(d.network is not None for d in disks)
    formats = [(d.driver_type, qcow2_compat(d.source) if auto and d.driver_type == "qcow2" and
                d.network is None else None) for d in disks]
    method = method_choice.choose_method(settings.method, settings.domains_method, name, running, formats, network)
    if auto and method == "bitmap" and connection is not None:
        problem = bitmap_problem(connection)
        if problem:
            log.info("domain '%s': method auto chose snapshot: the bitmap method cannot run here (%s)", name, problem)
            return "snapshot"
    return method


def _checkpoint_names(dom: libvirt.virDomain) -> list[str]:
    """Return the names of the domain's checkpoints that are not kvm-borg's own: the bitmap method's
    checkpoints survive an external snapshot and its blockcommit (measured on libvirt 9.0)."""
    try:
        return [c.getName() for c in dom.listAllCheckpoints(0) if not is_own_checkpoint(c.getName())]
    except (libvirt.libvirtError, AttributeError):
        return []


@translating
def make_plan(handle: DomainHandle, settings: Settings, excluded_targets: list[str], timestamp: str) -> DomainPlan:
    """Given a domain, the settings, disk targets to leave out and the run's timestamp, return its DomainPlan.

    Raises RefusedError, with nothing changed, when a backup would be unsafe: a pending journal
    entry or a disk already on a kvm-borg overlay (run `kvm-borg recover`), libvirt checkpoints (not kvm-borg's),
    an active block job, an overlay that already exists, or too little room for overlays. A libvirt
    failure is an EngineError."""
    name, dom = handle.name, handle.dom
    running = bool(dom.isActive())
    recover_hint = f"run `kvm-borg recover '{name}'` first"
    if journal.read_entry(settings.journal_dir, handle.uuid) is not None:
        raise RefusedError(f"domain '{name}' has an unfinished backup in the journal: {recover_hint}")
    xml = dom.XMLDesc(0)
    disks, skipped = choose_disks(xml, excluded_targets)
    for skip in skipped:
        log.info("domain '%s': skipping disk %s (%s)", name, skip.target, skip.reason)
    method = choose_method(settings, name, running, disks, handle.connection) if disks else settings.method
    disks, left_out = leave_out_network_disks(settings, name, running, method, disks, handle.connection)
    warnings = tuple(f"domain '{name}': disk {s.target} ({d.source}) is NOT backed up: {s.reason}"
                     for s, d in left_out)
    for warning in warnings:
        log.warning("%s", warning)
    skipped = [*skipped, *(s for s, _ in left_out)]
    if not disks:
        raise RefusedError(f"domain '{name}' has no disk to back up"
                           + "".join(f"; {w.split(': ', 1)[1]}" for w in warnings))
    checkpoints = _checkpoint_names(dom) if method == "snapshot" else []
    if checkpoints:
        raise RefusedError(
            f"domain '{name}' has libvirt checkpoints ({', '.join(checkpoints)}): external snapshots are "
            "impossible while they exist; remove them (virsh checkpoint-delete) or exclude the domain"
        )
    for disk in disks:
        if is_overlay_path(disk.source):
            raise RefusedError(
                f"disk {disk.target} of domain '{name}' runs on a kvm-borg overlay ({disk.source}): {recover_hint}"
            )
        if running and dom.blockJobInfo(disk.target, 0):
            raise RefusedError(f"disk {disk.target} of domain '{name}' has an active block job; try again later")
    overlays: dict[str, str] = {}
    if running and method == "snapshot":
        fallback = overlay_fallback_dir(settings)
        overlay_dir = str(settings.overlay_dir) if settings.overlay_dir else None
        overlays = {d.target: overlay_path(d.source, d.source_type, overlay_dir, fallback, timestamp) for d in disks}
        if any(os.path.dirname(p) == fallback for p in overlays.values()):
            os.makedirs(fallback, mode=0o755, exist_ok=True)  # QEMU must reach its overlays
        check_overlay_room(name, list(overlays.values()), settings.overlay_min_free)
    return DomainPlan(
        name=name,
        uuid=handle.uuid,
        running=running,
        disks=tuple(disks),
        skipped=tuple(skipped),
        overlays=overlays,
        quiesce=settings.quiesce,
        method=method,
        full_read=settings.full_read,
        warnings=warnings,
    )


def leave_out_network_disks(settings: Settings, name: str, running: bool, method: str, disks: list[DiskPlan],
                            connection: Connection | None) -> tuple[list[DiskPlan], list[tuple[SkippedDisk, DiskPlan]]]:
    """Given the settings, a domain's name, whether it runs, its chosen method and disks, return (the disks to
    back up, [(SkippedDisk, DiskPlan)] of the network disks this method cannot read): see
    method_choice.network_disk_reason. The caller warns about each one left out: never silently."""
    network = [d for d in disks if d.network is not None]
    if not network:
        return disks, []
    configured = method_choice.configured_method(settings.method, settings.domains_method, name)
    why_not = bitmap_problem(connection) if connection is not None and configured == "auto" else None
    reason = method_choice.network_disk_reason(method, running, configured, why_not)
    if reason is None:
        return disks, []
    return [d for d in disks if d.network is None], [(SkippedDisk(d.target, reason), d) for d in network]


def check_overlay_room(name: str, overlays: list[str], min_free: int) -> None:
    """Refuse when an overlay already exists or a directory for overlays lacks `min_free` bytes."""
    for path in overlays:
        if os.path.lexists(path):
            raise RefusedError(f"domain '{name}': overlay {path} already exists; run `kvm-borg recover '{name}'`")
    for directory in sorted({os.path.dirname(p) for p in overlays}):
        if not os.path.isdir(directory):
            raise RefusedError(f"domain '{name}': overlay directory {directory} does not exist")
        free = shutil.disk_usage(directory).free
        if free < min_free:
            raise RefusedError(
                f"domain '{name}': only {free // 2**20} MiB free in {directory} for overlays, "
                f"{min_free // 2**20} MiB required (overlay_min_free)"
            )
