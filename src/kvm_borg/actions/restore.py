"""`kvm-borg restore`: write a domain's archived images, NVRAM and TPM state back, rewrite its XML, define it.

Order of work: read meta.json from the archive → plan every destination (`restore_plan`) →
refuse before anything changes (existing files, files of a running domain, an existing
name) → stream each stored file into a temporary name in its target directory, sparse, with
the recorded owner and mode, and rename it into place → rebase backing chains → write the
rewritten XML → define and start on request.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import posixpath
import pwd
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from kvm_borg import host_state, restore_plan, signals
from kvm_borg.actions import archive_select
from kvm_borg.actions.common import Context, backend_for, check_passphrase_file, print_json
from kvm_borg.actions.restored_xml import sanitized_xml
from kvm_borg.config import select_repositories
from kvm_borg.engine.domain_xml import firmware_files, parse_disks
from kvm_borg.errors import KvmBorgError, RefusedError, UsageError
from kvm_borg.restore_plan import RestoreFile, RestorePlan

log = logging.getLogger(__name__)

BLOCK = 4096  # hole granularity: a file system block
SEGMENT = 64 * 1024  # zero test of a larger piece first, blocks only inside mixed segments
FLUSH = 4 * 1024 * 1024
WRITEBACK = 64 * 1024 * 1024  # a restored file's pages are handed to writeback in steps of this size
_ZERO_SEGMENT = bytes(SEGMENT)
_ZERO_BLOCK = bytes(BLOCK)
MAX_META_BYTES = 16 << 20
TEMP_MARK = ".kvm-borg-restore-"


# --- reading the archive -----------------------------------------------------------------------


def open_repository(ctx: Context, repo_name: str | None):
    """Given --repo (None: the first configured repository), return (repo dict, backend)."""
    repos = select_repositories(ctx.settings, [repo_name] if repo_name else None)
    repo = repos[0]
    check_passphrase_file(repo)
    return repo, backend_for(ctx, repo)


def resolve_archive(backend, domain: str, archive: str | None) -> str:
    """Given a domain and --archive (None or "latest": this host's newest not dated in the future), return the archive name."""
    return archive_select.choose(backend, getattr(backend, "settings", None), domain, archive, None).name


def read_bytes(backend, archive: str, archive_path: str, limit: int = MAX_META_BYTES) -> bytes:
    """Given an archive and a stored path, return the stored file's bytes (a small file)."""
    parts: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise UsageError(f"{archive_path} in {archive} is larger than {limit} bytes")
        parts.append(data)

    stream_file(backend, archive, archive_path, collect)
    return b"".join(parts)


def stream_file(backend, archive: str, archive_path: str, write) -> None:
    """Given a backend, pass one stored file's bytes to `write`; backends without `stream_file`
    extract it into a private temporary directory first."""
    if hasattr(backend, "stream_file"):
        backend.stream_file(archive, archive_path, write)
        return
    with tempfile.TemporaryDirectory(prefix="kvm-borg-read-") as workdir:
        path = Path(workdir, "file")
        backend.extract_file(archive, archive_path, path)
        with open(path, "rb") as handle:
            while data := handle.read(FLUSH):
                write(data)


def read_meta(backend, archive: str, domain: str | None) -> tuple[dict, frozenset[str]]:
    """Given an archive, return (its meta.json, the set of its paths without leading "/").

    meta.json is found by listing: a path ending in /meta.json whose JSON is kvm-borg's."""
    paths = frozenset(p.lstrip("/") for p in backend.list_paths(archive))
    found = []
    for candidate in restore_plan.meta_candidates(sorted(paths)):
        meta = restore_plan.parse_meta(read_bytes(backend, archive, candidate).decode("utf-8", "replace"))
        if meta is not None:
            found.append(meta)
    if not found:
        raise UsageError(f"archive {archive} holds no kvm-borg meta.json")
    if domain is not None:  # an archive of `kvm-borg freeze --all` (borgmatic) holds several domains
        names = sorted(m["domain"].get("name") for m in found)
        found = [m for m in found if m["domain"].get("name") == domain]
        if not found:
            raise UsageError(f"archive {archive} holds domain {', '.join(map(repr, names))}, not {domain!r}")
    if len(found) > 1:
        raise UsageError(f"archive {archive} holds {len(found)} kvm-borg meta.json files; refusing to guess")
    return found[0], paths


# --- writing files -----------------------------------------------------------------------------


class SparseWriter:
    """Writes a stream into a file descriptor, leaving holes where whole blocks are zero."""

    def __init__(self, fd: int):
        self.fd = fd
        self.offset = 0  # file offset where `pending` starts
        self.pending = b""  # the tail of the stream that does not fill a block yet
        self.written = 0  # bytes of data actually written (not holes)
        self.handed_back = 0  # the file up to here is written back or on its way

    def write(self, data: bytes) -> None:
        # Each piece is written as it comes (no 4 MiB buffer to copy and shift): only a tail
        # shorter than a block waits for the next piece.
        if self.pending:
            data = self.pending + data
        elif not isinstance(data, bytes):
            data = bytes(data)
        usable = len(data) - len(data) % BLOCK
        self.pending = data[usable:]
        if usable:
            self._emit(data, usable)
        if self.offset - self.handed_back >= WRITEBACK:
            # Start writing back what is restored so far and let it leave the page cache
            # (DONTNEED starts writeback of dirty pages): the final fsync has little left to do,
            # and a large restore does not push the host's cache out.
            try:
                os.posix_fadvise(self.fd, self.handed_back, self.offset - self.handed_back, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # only a hint
            self.handed_back = self.offset

    def close(self) -> int:
        """Write what is left, set the final size (a trailing hole too); return the size."""
        if self.pending:
            self._emit(self.pending, len(self.pending))
            self.pending = b""
        os.ftruncate(self.fd, self.offset)
        return self.offset

    def _emit(self, data: bytes, length: int) -> None:
        """Write data[:length] at `offset`, leaving the block-aligned all-zero blocks as holes."""
        if data.find(_ZERO_BLOCK, 0, length) == -1:  # the common case: no block of zeros at all, one write
            self._write(data, 0, length)
        else:
            run_start = None  # start (index in data) of a run of blocks to write
            for position in range(0, length, SEGMENT):
                end = min(position + SEGMENT, length)
                if end - position == SEGMENT and data[position:end] == _ZERO_SEGMENT:
                    run_start = self._end_run(data, run_start, position)
                elif data.find(_ZERO_BLOCK, position, end) == -1:  # data only: test no block
                    if run_start is None:
                        run_start = position
                else:
                    for here in range(position, end, BLOCK):
                        if here + BLOCK <= end and data[here:here + BLOCK] == _ZERO_BLOCK:
                            run_start = self._end_run(data, run_start, here)
                        elif run_start is None:
                            run_start = here
            self._end_run(data, run_start, length)
        self.offset += length

    def _end_run(self, data: bytes, run_start: int | None, end: int) -> None:
        if run_start is not None and end > run_start:
            self._write(data, run_start, end)
        return None

    def _write(self, data: bytes, start: int, end: int) -> None:
        view = memoryview(data)[start:end]
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + start + done)
        self.written += len(view)


def _owner_ids(entry: RestoreFile) -> tuple[int, int]:
    """Given a RestoreFile, return (uid, gid) of its recorded owner names on this host (root if unknown here)."""
    uid = gid = 0
    if entry.owner:
        try:
            uid = pwd.getpwnam(entry.owner).pw_uid
        except KeyError:
            log.info("user %s of %s does not exist here; the file will be root's", entry.owner, entry.destination)
    if entry.group:
        try:
            gid = grp.getgrnam(entry.group).gr_gid
        except KeyError:
            pass
    return uid, gid


def make_dirs(path: str) -> None:
    """Create the missing directories of `path` with mode 0711 (QEMU must traverse, nobody may list)."""
    missing = []
    current = Path(path)
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o711)
        os.chmod(directory, 0o711)


def restore_file(backend, archive: str, entry: RestoreFile, *, sparse: bool = True) -> int:
    """Given a RestoreFile, stream it from the archive into a temporary name beside its destination
    (sparse, owner and mode set, fsynced) and rename it into place; return its size."""
    directory, base = posixpath.split(entry.destination)
    make_dirs(directory)
    temp = posixpath.join(directory, f".{base}{TEMP_MARK}{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = SparseWriter(fd)
        if sparse:
            stream_file(backend, archive, entry.archive_path, writer.write)
            size = writer.close()
        else:
            def write_all(data: bytes) -> None:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            stream_file(backend, archive, entry.archive_path, write_all)
            size = os.lseek(fd, 0, os.SEEK_CUR)
        uid, gid = _owner_ids(entry)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, entry.mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, entry.destination)
    return size


def write_text_atomic(path: str, text: str, mode: int = 0o600) -> None:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    directory, base = posixpath.split(path)
    make_dirs(directory)
    temp = posixpath.join(directory, f".{base}{TEMP_MARK}{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        os.unlink(temp)
        raise
    os.replace(temp, path)


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    """Run qemu-img with `args`; a failure is a KvmBorgError with its last stderr line."""
    try:
        proc = subprocess.run(("qemu-img",) + args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise KvmBorgError("qemu-img not found: install qemu-utils") from None
    return proc


def image_format(path: str) -> str:
    """Given a restored image, return its format as qemu-img detects it."""
    proc = qemu_img("info", "--output=json", path)
    if proc.returncode != 0:
        raise KvmBorgError(f"qemu-img info {path} failed: {_last_line(proc.stderr)}")
    return json.loads(proc.stdout)["format"]


def rebase_chain(disk: restore_plan.RestoreDisk) -> None:
    """Given a restored disk with backing files, point each layer at the restored layer below it."""
    layers = [(disk.image.destination, disk.format)] + [(f.destination, image_format(f.destination))
                                                        for f, _fmt in disk.backing]
    for (upper, upper_format), (lower, lower_format) in zip(layers, layers[1:]):
        proc = qemu_img("rebase", "-u", "-f", upper_format, "-b", lower, "-F", lower_format, upper)
        if proc.returncode != 0:
            raise KvmBorgError(f"qemu-img rebase {upper} failed: {_last_line(proc.stderr)}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


# --- refusals ----------------------------------------------------------------------------------


def running_domain_files(conn: libvirt.virConnect) -> dict[str, str]:
    """Return {real path: domain name} of every file a running domain uses (images, backing files, NVRAM, TPM dir)."""
    used: dict[str, str] = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError:
            continue
        paths = []
        for disk in parse_disks(xml):
            paths += [p for p in (disk.source, *disk.backing_chain) if p]
        nvram = firmware_files(xml).get("nvram")
        if nvram:
            paths.append(nvram)
        if ET.fromstring(xml).find("./devices/tpm/backend[@type='emulator']") is not None:
            paths.append(posixpath.join(restore_plan.TPM_STATE_ROOT, dom.UUIDString()))
        for path in paths:
            used[os.path.realpath(path)] = dom.name()
    return used


def _in_use_by(path: str, used: dict[str, str]) -> str | None:
    real = os.path.realpath(path)
    for used_path, name in used.items():
        if real == used_path or real.startswith(used_path.rstrip("/") + "/"):
            return name
    return None


def check_refusals(conn: libvirt.virConnect, plan: RestorePlan, destinations: list[str], *, define: bool,
                   overwrite: bool) -> None:
    """Refuse (RefusedError, nothing changed) what a restore must not do without --overwrite, or at all."""
    used = running_domain_files(conn)
    for path in destinations:
        owner = _in_use_by(path, used)
        if owner is not None:
            raise RefusedError(f"{path} belongs to the running domain {owner!r}; shut it off first")
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                raise RefusedError(f"{path} is a directory")
            if not overwrite:
                raise RefusedError(f"{path} exists; give --overwrite to replace it")
    if define:
        existing = _lookup(conn, plan.domain)
        if existing is not None:
            if not overwrite:
                raise RefusedError(f"domain {plan.domain!r} exists; give --overwrite to replace it, or --name NEW")
            if existing.isActive():
                raise RefusedError(f"domain {plan.domain!r} is running; shut it off first")
        by_uuid = _lookup_uuid(conn, plan.uuid)
        if by_uuid is not None and by_uuid.name() != plan.domain:
            raise RefusedError(
                f"domain {by_uuid.name()!r} has the archived UUID {plan.uuid}; restore with --name NEW for a copy"
            )


def _lookup(conn: libvirt.virConnect, name: str):
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def _lookup_uuid(conn: libvirt.virConnect, uuid: str):
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError:
        return None


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
    """Refuse contradictory options (UsageError) before anything is read."""
    if options.to is not None and len(options.disks) != 1:
        raise UsageError("--to needs exactly one --disk TARGET")
    if options.to is not None and (options.define or options.start or options.name or options.target_dir):
        raise UsageError("--to restores one disk only: it takes no --define, --start, --name or --target-dir")
    if options.disks and (options.define or options.start):
        raise UsageError("--define and --start need every disk: leave out --disk")
    if options.name is not None and not options.name.strip():
        raise UsageError("--name needs a non-empty name")


def run_restore(ctx: Context, options: RestoreOptions) -> RestoreResult:
    """Given RestoreOptions, restore the domain; return what was written and defined."""
    started_at = time.monotonic()
    check_options(options)
    repo, backend = open_repository(ctx, options.repo)
    chosen = archive_select.choose(backend, ctx.settings, options.domain, options.archive, options.host)
    archive = chosen.name
    meta, paths = read_meta(backend, archive, options.domain)
    archive_select.check_meta_host(meta, chosen, archive)

    if options.to is not None:
        result = _restore_one_disk(ctx, backend, repo, archive, meta, paths, options, started_at)
        result.warnings[:0] = chosen.warnings
        return result

    target_dir = os.path.abspath(options.target_dir) if options.target_dir else None
    plan = restore_plan.plan_restore(meta, paths, target_dir=target_dir, new_name=options.name,
                                     new_uuid=options.new_uuid, disks=options.disks)
    xml_text = archived_xml = None
    if plan.xml_path:
        archived_xml, xml_text = _restored_xml(backend, archive, meta, paths, plan, options)
    define = options.define or options.start
    conn = ctx.connection.conn
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
    created: list[str] = []
    try:
        for disk in plan.disks:
            for entry in [disk.image] + [f for f, _fmt in disk.backing]:
                existed = os.path.lexists(entry.destination)
                log.info("restoring %s from %s to %s", disk.target, archive, entry.destination)
                result.bytes_written += restore_file(backend, archive, entry)
                if not existed:
                    created.append(entry.destination)
            if disk.backing:
                rebase_chain(disk)
            result.disks[disk.target] = disk.image.destination
            result.formats[disk.target] = disk.format
        if plan.nvram:
            if not os.path.lexists(plan.nvram.destination):
                created.append(plan.nvram.destination)
            restore_file(backend, archive, plan.nvram, sparse=False)
            result.nvram = plan.nvram.destination
        for entry in plan.tpm_files:
            if not os.path.lexists(entry.destination):
                created.append(entry.destination)
            restore_file(backend, archive, entry, sparse=False)
        if plan.tpm_files:
            result.tpm = plan.tpm_dir
        if xml_text is not None:
            if not os.path.lexists(plan.xml_path):
                created.append(plan.xml_path)
            write_text_atomic(plan.xml_path, xml_text)
        if define:
            _define(conn, plan, xml_text, options.overwrite)
            result.defined = True
        if options.start:
            conn.lookupByName(plan.domain).create()
            result.started = True
    except BaseException:
        for path in reversed(created):
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    result.warnings += _network_warnings(conn, meta, xml_text)
    result.seconds = time.monotonic() - started_at
    return result


def _restored_xml(backend, archive: str, meta: dict, paths: frozenset[str], plan: RestorePlan,
                  options: RestoreOptions) -> tuple[str, str]:
    """Given the plan, return (the archived persistent XML, that XML rewritten for the restored domain)."""
    xml_archive_path = restore_plan.check_archive_path((meta.get("files") or {}).get("domain_xml"), "domain XML")
    if xml_archive_path not in paths:
        raise UsageError(f"archive {archive} lacks the domain XML {xml_archive_path}")
    archived_xml = read_bytes(backend, archive, xml_archive_path).decode("utf-8")
    firmware = meta.get("firmware")
    if "firmware" not in meta and restore_plan.declared_nvram(archived_xml):
        raise UsageError(f"archive {archive} predates NVRAM capture and its domain uses UEFI variables; "
                         "restore its disks with --disk instead")
    if firmware and firmware.get("nvram") and (meta.get("files") or {}).get("nvram") and plan.nvram is None:
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


def _define(conn: libvirt.virConnect, plan: RestorePlan, xml_text: str, overwrite: bool) -> None:
    existing = _lookup(conn, plan.domain)
    if existing is not None and existing.UUIDString() != plan.uuid:
        if not overwrite or existing.isActive():  # checked before; the state may have changed since
            raise RefusedError(f"domain {plan.domain!r} exists")
        existing.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM)
    try:
        conn.defineXML(xml_text)
    except libvirt.libvirtError as exc:
        raise KvmBorgError(f"cannot define domain {plan.domain!r}: {exc.get_error_message()}") from None


def _network_warnings(conn: libvirt.virConnect, meta: dict, domain_xml: str | None) -> list[str]:
    """Given meta.json and the restored XML, return a warning for each network it uses that this host lacks."""
    warnings = []
    for name in host_state.interface_networks(domain_xml) if domain_xml else []:
        try:
            conn.networkLookupByName(name)
        except libvirt.libvirtError:
            path = ((meta.get("files") or {}).get("networks") or {}).get(name)
            where = f"its XML is archived as /{path}" if path else "the archive has no XML of it either"
            warnings.append(f"network {name!r} does not exist here ({where})")
    return warnings


def _restore_one_disk(ctx: Context, backend, repo: dict, archive: str, meta: dict, paths: frozenset[str],
                      options: RestoreOptions, started_at: float) -> RestoreResult:
    """--disk TARGET --to FILE|-: one disk's image as stored, to a file (sparse) or to stdout."""
    plan = restore_plan.plan_restore(meta, paths, target_dir="/", disks=options.disks, with_xml=False)
    [disk] = plan.disks
    result = RestoreResult(domain=plan.domain, archive=archive, repository=repo["name"], disks={}, xml=None)
    if options.to == "-":
        out = sys.stdout.buffer
        sys.stdout.flush()
        stream_file(backend, archive, disk.image.archive_path, out.write)
        out.flush()
        result.disks[disk.target] = "-"
    else:
        destination = os.path.abspath(options.to)
        entry = RestoreFile(disk.image.archive_path, destination, disk.image.mode, disk.image.owner,
                            disk.image.group)
        check_refusals(ctx.connection.conn, plan, [destination], define=False, overwrite=options.overwrite)
        restore_file(backend, archive, entry)
        result.disks[disk.target] = destination
    if disk.backing:
        result.warnings.append(f"disk {disk.target} has backing files; only its top image was restored")
    result.seconds = time.monotonic() - started_at
    return result


# --- the command -------------------------------------------------------------------------------


def add_arguments(subparsers) -> None:
    """Register `kvm-borg restore`."""
    parser = subparsers.add_parser("restore", help="restore a domain from an archive")
    parser.add_argument("domain", metavar="DOMAIN", help="the archived domain's name")
    parser.add_argument("--archive", metavar="NAME", default="latest", help="archive name, or latest (default)")
    parser.add_argument("--repo", metavar="NAME", help="repository to read (default: the first configured)")
    parser.add_argument("--host", metavar="NAME", help="take the archives made on host NAME (default: this host)")
    parser.add_argument("--target-dir", metavar="DIR", help="write every file here (default: the original places)")
    parser.add_argument("--name", metavar="NEW", help="restore as a copy: new name, UUID and MAC addresses")
    parser.add_argument("--define", action="store_true", help="define the restored domain in libvirt")
    parser.add_argument("--start", action="store_true", help="define and start the restored domain")
    parser.add_argument("--disk", action="append", default=[], metavar="TARGET", help="only this disk (repeatable)")
    parser.add_argument("--to", metavar="FILE", help="with one --disk: write its image to FILE, or - for stdout")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files and an existing shut-off domain")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run_from_args)


def run_from_args(ctx: Context, args) -> int:
    if args.to == "-" and args.json:
        raise UsageError("--to - writes the image to stdout: it takes no --json")
    options = RestoreOptions(
        domain=args.domain, archive=args.archive, repo=args.repo, target_dir=args.target_dir, name=args.name,
        define=args.define, start=args.start, disks=args.disk, to=args.to, overwrite=args.overwrite,
        host=args.host,
    )
    with signals.interruptible():  # a SIGTERM still removes temporary and partly restored files
        try:
            result = run_restore(ctx, options)
        except OSError as exc:  # ENOSPC, EACCES...: one line, after the partial files were removed
            raise KvmBorgError(f"restore failed: {exc.filename or ''}: {exc.strerror or exc}") from None
    for warning in result.warnings:
        log.warning("%s", warning)
    if args.json:
        print_json(result.as_dict())
    elif args.to != "-":
        print(f"{result.domain}: restored from {result.archive} ({result.repository}) in {result.seconds:.1f}s")
        for target, path in result.disks.items():
            print(f"  {target}: {path}")
        for label, value in (("nvram", result.nvram), ("tpm", result.tpm), ("xml", result.xml)):
            if value:
                print(f"  {label}: {value}")
        if result.defined:
            print(f"  defined{' and started' if result.started else ''}")
    return 1 if result.warnings else 0
