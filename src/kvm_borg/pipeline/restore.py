"""`kvm-borg restore`: write a domain's archived images, NVRAM and TPM state back, rewrite its XML, define it.

Order of work: list the archive (paths and their kinds) and read meta.json (checked whole) →
plan every destination (`restore_plan`: from this host, never from the archive) → refuse
before anything changes (existing files, files of a running domain, an existing name, an
unfinished journal entry, a symlink on the way) → stream each stored file, a regular file in
the archive, into a temporary name in its target directory (O_EXCL|O_NOFOLLOW), sparse, root's
0600 (or the local owner of the file it replaces), and rename it into place → rebase backing
chains with the recorded formats → write the rewritten XML → define and start on request; a
failing define/start keeps the restored files and undefines only a domain it defined.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from kvm_borg import archive_meta, restore_plan
from kvm_borg.engine import lifecycle
from kvm_borg.engine.domain_xml import parse_disks
from kvm_borg.engine.host_facts import host_facts
from kvm_borg.engine.host_state import interface_networks
from kvm_borg.errors import EngineError, KvmBorgError, RefusedError, UsageError
from kvm_borg.models import RepositoryBackend
from kvm_borg.pipeline import archive as archive_reading
from kvm_borg.restore_files import (
    block_device_size,
    rebase_chain,
    restore_file,
    restore_segmented,
    stream_segmented,
    write_into_device,
    write_segmented_into_device,
    write_text,
)
from kvm_borg.restore_plan import RestoreFile, RestorePlan
from kvm_borg.restore_refusals import (
    check_refusals,
    destination_kind,
    in_use_by,
    running_domain_files,
    unfinished_journal_entry,
)
from kvm_borg.xml_sanitize import sanitize_domain_xml

log = logging.getLogger(__name__)


def local_disks(conn, name: str) -> dict[str, restore_plan.LocalDisk] | None:
    """Given a domain name, return {target: LocalDisk} of its definition on this host (None if it is not defined
    here). Sources are resolved (a symlinked image is restored into the file it names); a block device is
    marked as one."""
    xml = lifecycle.inactive_xml(conn, name)
    if xml is None:
        return None
    result = {}
    for disk in parse_disks(xml):
        if disk.device != "disk" or disk.disk_type not in ("file", "block") or not disk.source:
            continue
        source = os.path.realpath(disk.source)
        try:
            block = disk.disk_type == "block" or stat.S_ISBLK(os.stat(source).st_mode)
        except OSError:
            block = disk.disk_type == "block"
        result[disk.target] = restore_plan.LocalDisk(source, block)
    return result


# --- the restore -------------------------------------------------------------------------------


@dataclass
class RestoreOptions:
    domain: str
    archive: str | None = None
    repo: str | None = None
    target_dir: str | None = None
    name: str | None = None
    define: bool = False
    start: bool = False
    disks: list[str] = field(default_factory=list)
    to: str | None = None
    overwrite: bool = False
    isolate: bool = False  # verify: no network, serial output into the target dir
    new_uuid: str | None = None
    host: str | None = None  # --host: whose archives (default: this host's)


@dataclass
class RestoreResult:
    domain: str
    archive: str
    repository: str
    disks: dict[str, str]
    xml: str | None
    uuid: str | None = None
    nvram: str | None = None
    tpm: str | None = None
    defined: bool = False
    started: bool = False
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0
    meta: dict = field(default_factory=dict, repr=False)
    formats: dict[str, str] = field(default_factory=dict)
    archived_xml: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {
            "domain": self.domain, "archive": self.archive, "repository": self.repository,
            "disks": self.disks, "xml": self.xml, "uuid": self.uuid, "nvram": self.nvram, "tpm": self.tpm,
            "defined": self.defined, "started": self.started, "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def check_options(options: RestoreOptions) -> None:
    """Refuse contradictory options and a --name libvirt would refuse (UsageError) before anything is read."""
    if options.to is not None and len(options.disks) != 1:
        raise UsageError("--to needs exactly one --disk TARGET")
    if options.to is not None and (options.define or options.start or options.name or options.target_dir):
        raise UsageError("--to restores one disk only: it takes no --define, --start, --name or --target-dir")
    if options.disks and (options.define or options.start):
        raise UsageError("--define and --start need every disk: leave out --disk")
    if options.name is not None:
        archive_meta.check_domain_name(options.name, "invalid --name")


def run_restore(settings, conn, repo: dict, backend: RepositoryBackend, options: RestoreOptions) -> RestoreResult:
    """Given the Settings, a libvirt connection, the repository (its config entry and backend) and RestoreOptions
    (passed by check_options), restore the domain; return what was written and defined.

    A libvirt error anywhere is a KvmBorgError (one line), never a traceback."""
    try:
        return _run_restore(settings, conn, repo, backend, options)
    except EngineError as exc:
        raise KvmBorgError(f"restore failed: {exc}") from None


def _run_restore(settings, conn, repo: dict, backend: RepositoryBackend, options: RestoreOptions) -> RestoreResult:
    started_at = time.monotonic()
    chosen = archive_reading.choose(backend, settings, options.domain, options.archive, options.host)
    archive = chosen.name
    read = archive_reading.read_archive_files(backend, archive, options.domain)  # meta.json + XMLs: one call
    meta, entries = read.meta, read.entries
    archive_reading.check_meta_host(meta, chosen, archive)
    paths = frozenset(entries)

    if options.to is not None:
        result = _restore_one_disk(conn, backend, repo, archive, meta, entries, options, started_at,
                                   scratch_dir=str(settings.state_dir))
        result.warnings[:0] = chosen.warnings
        return result

    target_dir = os.path.abspath(options.target_dir) if options.target_dir else None
    local = local_disks(conn, meta["domain"]["name"]) if target_dir is None else None
    plan = restore_plan.plan_restore(meta, paths, target_dir=target_dir, new_name=options.name,
                                     new_uuid=options.new_uuid, disks=options.disks, local_disks=local,
                                     archive_types=entries)
    xml_text = archived_xml = None
    if plan.xml_path:
        archived_xml, xml_text = restored_xml(backend, archive, meta, entries, plan, options, small=read.small)
    define = options.define or options.start
    if plan.in_place or options.overwrite:
        uuids = [plan.original_uuid] + [d.uuid for d in [lifecycle.facts(conn, plan.original_name)] if d is not None]
        if unfinished_journal_entry(settings.journal_dir, plan.original_name, uuids):
            raise RefusedError(f"domain {plan.original_name!r} has an unfinished backup in the journal; "
                               f"run 'kvm-borg recover {plan.original_name}' first")
    sanitize_warnings: list[str] = []
    if xml_text is not None:  # what is written and defined is only ever the sanitized XML
        xml_text, sanitize_warnings = sanitized_xml(conn, xml_text, plan, isolate=options.isolate,
                                                    scratch_dir=options.target_dir if options.isolate else None)
    check_refusals(conn, plan, plan.destinations(), define=define, overwrite=options.overwrite)

    result = RestoreResult(domain=plan.domain, archive=archive, repository=repo["name"], disks={},
                           xml=plan.xml_path, uuid=plan.uuid if plan.xml_path else None, warnings=list(plan.warnings),
                           meta=meta, archived_xml=archived_xml)
    result.warnings[:0] = chosen.warnings
    result.warnings += sanitize_warnings
    write_files(backend, archive, plan, xml_text, result)
    if define:
        _define_and_start(conn, plan, xml_text, options, result)
    result.warnings += _network_warnings(conn, meta, xml_text)
    result.seconds = time.monotonic() - started_at
    return result


def write_files(backend: RepositoryBackend, archive: str, plan: RestorePlan, xml_text: str | None, result: RestoreResult) -> None:
    """Write every file of the plan into `result`; on any failure remove the files this restore created."""
    created: list[str] = []

    def write(entry: RestoreFile, sparse: bool = True) -> int:
        existed = os.path.lexists(entry.destination)
        size = restore_file(backend, archive, entry.archive_path, entry.destination, sparse=sparse)
        if not existed:
            created.append(entry.destination)
        return size

    def write_segmented(disk) -> int:
        existed = os.path.lexists(disk.image.destination)
        size = restore_segmented(backend, archive, disk, disk.image.destination)
        if not existed:
            created.append(disk.image.destination)
        return size

    try:
        for disk in plan.disks:
            if disk.segmented:  # flat: no backing files
                log.info("restoring %s from %s (segments) to %s", disk.target, archive, disk.image.destination)
                result.bytes_written += write_segmented(disk)
                result.disks[disk.target] = disk.image.destination
                result.formats[disk.target] = disk.format
                continue
            for entry in [disk.image] + [f for f, _fmt in disk.backing]:
                log.info("restoring %s from %s to %s", disk.target, archive, entry.destination)
                result.bytes_written += write(entry)
            if disk.backing:
                rebase_chain(disk)
            result.disks[disk.target] = disk.image.destination
            result.formats[disk.target] = disk.format
        if plan.nvram:
            write(plan.nvram, sparse=False)
            result.nvram = plan.nvram.destination
        for entry in plan.tpm_files:
            write(entry, sparse=False)
        if plan.tpm_files:
            result.tpm = plan.tpm_dir
        if xml_text is not None:
            if not os.path.lexists(plan.xml_path):
                created.append(plan.xml_path)
            write_text(plan.xml_path, xml_text)
    except BaseException:
        for path in reversed(created):
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def _define_and_start(conn, plan: RestorePlan, xml_text: str, options: RestoreOptions,
                      result: RestoreResult) -> None:
    """Define (and with --start start) the restored domain. On failure the restored files stay, a domain this
    restore defined is undefined again (never one that existed before), and the error is one line."""
    kept = f"the restored files are kept ({plan.xml_path or ', '.join(result.disks.values())})"
    existed = lifecycle.lookup(conn, plan.domain) is not None
    try:
        dom = _define(conn, plan, xml_text, options.overwrite)
    except EngineError as exc:
        raise KvmBorgError(f"cannot define domain {plan.domain!r}: {exc}; {kept}") from None
    result.defined = True
    if not options.start:
        return
    try:
        lifecycle.start(dom)
    except EngineError as exc:
        undone = ""
        if not existed:
            undone = _undefine_quietly(conn, plan.domain)
            result.defined = False
        raise KvmBorgError(f"cannot start domain {plan.domain!r}: {exc}; {undone}{kept}") from None
    result.started = True


def _undefine_quietly(conn, name: str) -> str:
    """Undefine a domain this restore defined, keeping its NVRAM and TPM state; return what happened, for the message."""
    dom = lifecycle.lookup(conn, name)
    if dom is None:
        return ""
    try:
        lifecycle.undefine_keeping_state(dom)
    except EngineError as exc:
        return f"undefining it failed too ({exc}); "
    return "it is not left defined; "


def restored_xml(backend: RepositoryBackend, archive: str, meta: dict, entries: dict[str, str], plan: RestorePlan,
                  options: RestoreOptions, small: dict[str, bytes] | None = None) -> tuple[str, str]:
    """Given the plan (and the small files read with meta.json, if any), return (the archived persistent XML,
    that XML rewritten for the restored domain)."""
    xml_archive_path, archived_xml = archive_reading.read_domain_xml(backend, archive, meta, entries, small)
    firmware = meta.get("firmware")
    try:
        if "firmware" not in meta and restore_plan.declared_nvram(archived_xml):
            raise UsageError(f"archive {archive} predates NVRAM capture and its domain uses UEFI variables; "
                             "restore its disks with --disk instead")
        if firmware and firmware.get("nvram") and meta["files"].get("nvram") and plan.nvram is None:
            raise UsageError("the domain's NVRAM would not be restored")  # by construction: never without it
        drop = restore_plan.removable_skipped_disks(meta) if options.name is not None else []
        if drop:
            plan.warnings.append(f"disks left out of the backup are not attached to the copy: {', '.join(drop)}")
        return archived_xml, restore_plan.rewrite_domain_xml(
            archived_xml,
            disks={d.target: (d.image.destination, d.format) for d in plan.disks},
            nvram=plan.nvram.destination if plan.nvram else None,
            name=plan.domain if options.name is not None else None,
            uuid=plan.uuid if options.name is not None else None,
            new_macs=options.name is not None,
            drop_disks=drop,
            isolate=options.isolate,
            scratch_dir=options.target_dir if options.isolate else None,
        )
    except ET.ParseError as exc:
        raise UsageError(f"archive {archive}: the domain XML {xml_archive_path} is malformed ({exc})") from None


def sanitized_xml(conn, xml_text: str, plan: RestorePlan, *, isolate: bool = False,
                  scratch_dir: str | None = None) -> tuple[str, list[str]]:
    """Given the rewritten XML of a restore, its plan and whether it is an isolated verify copy (with its
    scratch directory), return (the XML with only what this host allows, warnings naming what was removed).

    Only the plan's disks stay attached; the emulator and firmware are this host's; host paths
    are kept only where the local definition of the archived UUID uses them (kvm_borg.xml_sanitize)."""
    facts = host_facts(conn, xml_text, plan.original_uuid)
    return sanitize_domain_xml(
        xml_text, restored_targets={disk.target for disk in plan.disks}, host=facts,
        nvram=plan.nvram.destination if plan.nvram else None, isolate=isolate, scratch_dir=scratch_dir)


def _define(conn, plan: RestorePlan, xml_text: str, overwrite: bool):
    """Define the restored XML, first undefining (keeping NVRAM and TPM state) a shut-off domain of that name
    with another UUID when --overwrite allows it; return the defined domain."""
    existing = lifecycle.facts(conn, plan.domain)
    if existing is not None and existing.uuid != plan.uuid:
        if not overwrite or existing.active:  # checked before; the state may have changed since
            raise RefusedError(f"domain {plan.domain!r} exists")
        lifecycle.undefine_keeping_state(lifecycle.lookup(conn, plan.domain))
    return lifecycle.define(conn, xml_text)


def _network_warnings(conn, meta: dict, domain_xml: str | None) -> list[str]:
    """Given meta.json and the restored XML, return a warning for each network it uses that this host lacks."""
    warnings = []
    for name in interface_networks(domain_xml) if domain_xml else []:
        if not lifecycle.network_exists(conn, name):
            path = ((meta.get("files") or {}).get("networks") or {}).get(name)
            where = f"its XML is archived as /{path}" if path else "the archive has no XML of it either"
            warnings.append(f"network {name!r} does not exist here ({where})")
    return warnings


def _restore_one_disk(conn, backend: RepositoryBackend, repo: dict, archive: str, meta: dict, entries: dict[str, str],
                      options: RestoreOptions, started_at: float, *, scratch_dir: str) -> RestoreResult:
    """--disk TARGET --to FILE|DEVICE|-: one disk's image as stored, to a file (sparse), into a block device
    (with --overwrite), or to stdout. A segmented disk goes to a file in its original format (qcow2
    converted), into a device or to stdout as raw content (a device only for a raw disk)."""
    plan = restore_plan.plan_restore(meta, frozenset(entries), target_dir="/", disks=options.disks, with_xml=False,
                                     archive_types=entries, backing_formats_required=False)
    [disk] = plan.disks
    result = RestoreResult(domain=plan.domain, archive=archive, repository=repo["name"], disks={}, xml=None)
    if options.to == "-":
        out = sys.stdout.buffer
        sys.stdout.flush()
        if disk.segmented:
            stream_segmented(backend, archive, disk, out.write, scratch_dir)
        else:
            backend.stream_file(archive, disk.image.archive_path, out.write)
        out.flush()
        result.disks[disk.target] = "-"
    else:
        destination = os.path.abspath(options.to)
        kind = destination_kind(destination)
        if kind == "device":
            if disk.segmented and disk.format != "raw":
                raise UsageError(f"disk {disk.target} is a segmented {disk.format} disk: restore it into a file "
                                 f"(--to FILE); a block device takes segmented raw disks only")
            device = os.path.realpath(destination)
            if not options.overwrite:
                raise RefusedError(f"{destination} is a block device; give --overwrite to write the image into it")
            owner = in_use_by(device, running_domain_files(conn))
            if owner is not None:
                raise RefusedError(f"{destination} belongs to the running domain {owner!r}; shut it off first")
            size = block_device_size(device)
            if size < disk.virtual_size:
                raise RefusedError(f"{destination} holds {size} bytes, less than the {disk.virtual_size} bytes of "
                                   f"disk {disk.target}")
            if disk.segmented:
                result.bytes_written = write_segmented_into_device(backend, archive, disk, device)
            else:
                result.bytes_written = write_into_device(backend, archive, disk.image.archive_path, device)
        elif kind in ("file", "missing"):
            check_refusals(conn, plan, [destination], define=False, overwrite=options.overwrite)
            if disk.segmented:
                result.bytes_written = restore_segmented(backend, archive, disk, destination)
            else:
                result.bytes_written = restore_file(backend, archive, disk.image.archive_path, destination)
        else:
            raise UsageError(f"--to {destination} is a {kind}: give a regular file, a block device or -")
        result.disks[disk.target] = destination
    if disk.backing:
        result.warnings.append(f"disk {disk.target} has backing files; only its top image was restored")
    result.seconds = time.monotonic() - started_at
    return result


