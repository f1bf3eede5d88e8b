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

import json
import logging
import os
import posixpath
import secrets
import stat
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
from kvm_borg.sparse import SparseWriter

log = logging.getLogger(__name__)

FLUSH = 4 * 1024 * 1024
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


def archive_entries(backend, archive: str) -> dict[str, str]:
    """Given an archive, return {stored path without leading "/": kind} (file, dir, symlink, device...).

    A backend without `list_entries` gives only paths: their kind is "unknown", which restore
    refuses to read (only regular files are read from an archive)."""
    if hasattr(backend, "list_entries"):
        return {str(p).lstrip("/"): kind for p, kind in backend.list_entries(archive).items()}
    return {p.lstrip("/"): "unknown" for p in backend.list_paths(archive)}


def read_archive(backend, archive: str, domain: str | None) -> tuple[dict, dict[str, str]]:
    """Given an archive, return (its meta.json, checked whole, {path: kind} of its entries).

    meta.json is found by listing: a regular file ending in /meta.json whose JSON carries the
    `kvm_borg` marker. A candidate that is not a regular file, not UTF-8 or not JSON is reported
    when no good one is found; a marked one with a bad key is refused (archive_meta.check_meta)."""
    entries = archive_entries(backend, archive)
    found, problems = [], []
    for candidate in restore_plan.meta_candidates(sorted(entries)):
        if entries[candidate] != "file":
            problems.append(f"its meta.json {candidate} is a {entries[candidate]}, not a regular file; refused")
            continue
        try:
            data = json.loads(read_bytes(backend, archive, candidate).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            problems.append(f"its meta.json {candidate} is not valid JSON")
            continue
        if isinstance(data, dict) and "kvm_borg" in data:
            found.append(restore_plan.check_meta(data))
        else:
            problems.append(f"{candidate} is not a kvm-borg meta.json")
    if not found:
        raise UsageError(f"archive {archive}: {problems[0]}" if problems else
                         f"archive {archive} holds no kvm-borg meta.json")
    if domain is not None:  # an archive of `kvm-borg freeze --all` (borgmatic) holds several domains
        names = sorted(m["domain"]["name"] for m in found)
        found = [m for m in found if m["domain"]["name"] == domain]
        if not found:
            raise UsageError(f"archive {archive} holds domain {', '.join(map(repr, names))}, not {domain!r}")
    if len(found) > 1:
        raise UsageError(f"archive {archive} holds {len(found)} kvm-borg meta.json files; refusing to guess")
    return found[0], entries


def read_meta(backend, archive: str, domain: str | None) -> tuple[dict, frozenset[str]]:
    """Given an archive, return (its checked meta.json, the set of its paths without leading "/")."""
    meta, entries = read_archive(backend, archive, domain)
    return meta, frozenset(entries)


# --- writing files -----------------------------------------------------------------------------


def local_owner(destination: str) -> tuple[int, int, int]:
    """Given a destination, return (uid, gid, mode) for the restored file, chosen on this host: those of the
    regular file it replaces (without setuid/setgid/sticky, execute or world-write bits), else root's 0600."""
    try:
        st = os.lstat(destination)
    except FileNotFoundError:
        return 0, 0, 0o600
    if not stat.S_ISREG(st.st_mode):
        return 0, 0, 0o600
    return st.st_uid, st.st_gid, (stat.S_IMODE(st.st_mode) & 0o664) | 0o600


def make_dirs(path: str) -> None:
    """Create the missing directories of `path` with mode 0711 (QEMU must traverse, nobody may list)."""
    missing = []
    current = Path(path)
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o711)
        os.chmod(directory, 0o711)


def refuse_symlinks_below(root: str, path: str) -> None:
    """Given a trusted directory and a path below it, refuse (RefusedError) when an existing component between
    them (the path itself included) is a symlink or not a directory where one is needed: nothing is followed."""
    relative = posixpath.relpath(path, root)
    if relative == ".." or relative.startswith("../") or posixpath.isabs(relative):
        raise RefusedError(f"{path} is not below {root}")
    current = root
    parts = [] if relative == "." else relative.split("/")
    for index, part in enumerate(parts):
        current = posixpath.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise RefusedError(f"{current} is a symlink; refusing to restore through it")
        if index < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise RefusedError(f"{current} is not a directory")


def create_temp(directory: str, base: str, mode: int = 0o600) -> tuple[int, str]:
    """Given a directory and a file name, create a fresh temporary file beside it (O_EXCL|O_NOFOLLOW);
    return (fd, path)."""
    temp = posixpath.join(directory, f".{base}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    return fd, temp


def restore_file(backend, archive: str, entry: RestoreFile, *, sparse: bool = True) -> int:
    """Given a RestoreFile, stream it from the archive into a temporary name beside its destination
    (sparse, owner and mode chosen locally, fsynced) and rename it into place; return its size."""
    directory, base = posixpath.split(entry.destination)
    make_dirs(directory)
    uid, gid, mode = local_owner(entry.destination)
    fd, temp = create_temp(directory, base)
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
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, entry.destination)
    return size


def write_into_device(backend, archive: str, archive_path: str, device: str) -> int:
    """Given a block device, write one stored file into it from offset 0 (O_WRONLY: no truncate, no rename,
    every byte written, zeros too) and fsync it; return the bytes written."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    written = 0
    try:
        def write_all(data: bytes) -> None:
            nonlocal written
            view = memoryview(data)
            while view:
                done = os.write(fd, view)
                view = view[done:]
                written += done
        stream_file(backend, archive, archive_path, write_all)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def write_text_atomic(path: str, text: str, mode: int = 0o600) -> None:
    """Write `text` to a temporary name beside `path` (O_EXCL|O_NOFOLLOW), then rename it into place."""
    directory, base = posixpath.split(path)
    make_dirs(directory)
    fd, temp = create_temp(directory, base, mode)
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


def rebase_chain(disk: restore_plan.RestoreDisk) -> None:
    """Given a restored disk with backing files, point each layer at the restored layer below it, passing the
    formats meta.json records (-f/-F: nothing is probed from the data)."""
    layers = [(disk.image.destination, disk.format)] + [(f.destination, fmt) for f, fmt in disk.backing]
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
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                raise RefusedError(f"{path} is a directory")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise RefusedError(f"{path} exists and is not a regular file; refusing to replace it")
            if not overwrite:
                raise RefusedError(f"{path} exists; give --overwrite to replace it")
    if plan.nvram:
        refuse_symlinks_below(restore_plan.NVRAM_DIR, plan.nvram.destination)
    for entry in plan.tpm_files:
        refuse_symlinks_below(restore_plan.TPM_STATE_ROOT, entry.destination)
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


def unfinished_journal_entry(journal_dir: Path, name: str, uuids: list[str]) -> bool:
    """Given the journal directory, a domain's name and UUIDs, return whether an entry for it is pending
    (an unreadable entry file named after one of the UUIDs counts as pending)."""
    if not journal_dir.is_dir():
        return False
    for path in journal_dir.glob("*.json"):
        if path.stem in uuids:
            return True
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and (data.get("domain") == name or data.get("uuid") in uuids):
            return True
    return False


def local_disks(conn: libvirt.virConnect, name: str) -> dict[str, restore_plan.LocalDisk] | None:
    """Given a domain name, return {target: LocalDisk} of its definition on this host (None if it is not defined
    here). Sources are resolved (a symlinked image is restored into the file it names); a block device is
    marked as one."""
    dom = _lookup(conn, name)
    if dom is None:
        return None
    result = {}
    for disk in parse_disks(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
        if disk.device != "disk" or disk.disk_type not in ("file", "block") or not disk.source:
            continue
        source = os.path.realpath(disk.source)
        try:
            block = disk.disk_type == "block" or stat.S_ISBLK(os.stat(source).st_mode)
        except OSError:
            block = disk.disk_type == "block"
        result[disk.target] = restore_plan.LocalDisk(source, block)
    return result


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
    """Refuse contradictory options and a --name libvirt would refuse (UsageError) before anything is read."""
    if options.to is not None and len(options.disks) != 1:
        raise UsageError("--to needs exactly one --disk TARGET")
    if options.to is not None and (options.define or options.start or options.name or options.target_dir):
        raise UsageError("--to restores one disk only: it takes no --define, --start, --name or --target-dir")
    if options.disks and (options.define or options.start):
        raise UsageError("--define and --start need every disk: leave out --disk")
    if options.name is not None:
        restore_plan.check_domain_name(options.name, "invalid --name")


def run_restore(ctx: Context, options: RestoreOptions) -> RestoreResult:
    """Given RestoreOptions, restore the domain; return what was written and defined.

    A libvirt error anywhere is a KvmBorgError (one line), never a traceback."""
    try:
        return _run_restore(ctx, options)
    except libvirt.libvirtError as exc:
        raise KvmBorgError(f"restore failed: libvirt: {exc.get_error_message()}") from None


def _run_restore(ctx: Context, options: RestoreOptions) -> RestoreResult:
    started_at = time.monotonic()
    check_options(options)
    repo, backend = open_repository(ctx, options.repo)
    chosen = archive_select.choose(backend, ctx.settings, options.domain, options.archive, options.host)
    archive = chosen.name
    meta, entries = read_archive(backend, archive, options.domain)
    archive_select.check_meta_host(meta, chosen, archive)
    paths = frozenset(entries)
    conn = ctx.connection.conn

    if options.to is not None:
        result = _restore_one_disk(ctx, backend, repo, archive, meta, entries, options, started_at)
        result.warnings[:0] = chosen.warnings
        return result

    target_dir = os.path.abspath(options.target_dir) if options.target_dir else None
    local = local_disks(conn, meta["domain"]["name"]) if target_dir is None else None
    plan = restore_plan.plan_restore(meta, paths, target_dir=target_dir, new_name=options.name,
                                     new_uuid=options.new_uuid, disks=options.disks, local_disks=local,
                                     archive_types=entries)
    xml_text = archived_xml = None
    if plan.xml_path:
        archived_xml, xml_text = _restored_xml(backend, archive, meta, entries, plan, options)
    define = options.define or options.start
    if plan.in_place or options.overwrite:
        uuids = [plan.original_uuid] + [d.UUIDString() for d in [_lookup(conn, plan.original_name)] if d is not None]
        if unfinished_journal_entry(ctx.settings.journal_dir, plan.original_name, uuids):
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
    _write_files(backend, archive, plan, xml_text, result)
    if define:
        _define_and_start(conn, plan, xml_text, options, result)
    result.warnings += _network_warnings(conn, meta, xml_text)
    result.seconds = time.monotonic() - started_at
    return result


def _write_files(backend, archive: str, plan: RestorePlan, xml_text: str | None, result: RestoreResult) -> None:
    """Write every file of the plan into `result`; on any failure remove the files this restore created."""
    created: list[str] = []

    def write(entry: RestoreFile, sparse: bool = True) -> int:
        existed = os.path.lexists(entry.destination)
        size = restore_file(backend, archive, entry, sparse=sparse)
        if not existed:
            created.append(entry.destination)
        return size

    try:
        for disk in plan.disks:
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
            write_text_atomic(plan.xml_path, xml_text)
    except BaseException:
        for path in reversed(created):
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def _define_and_start(conn: libvirt.virConnect, plan: RestorePlan, xml_text: str, options: RestoreOptions,
                      result: RestoreResult) -> None:
    """Define (and with --start start) the restored domain. On failure the restored files stay, a domain this
    restore defined is undefined again (never one that existed before), and the error is one line."""
    kept = f"the restored files are kept ({plan.xml_path or ', '.join(result.disks.values())})"
    existed = _lookup(conn, plan.domain) is not None
    try:
        _define(conn, plan, xml_text, options.overwrite)
    except libvirt.libvirtError as exc:
        raise KvmBorgError(f"cannot define domain {plan.domain!r}: {exc.get_error_message()}; {kept}") from None
    result.defined = True
    if not options.start:
        return
    try:
        conn.lookupByName(plan.domain).create()
    except libvirt.libvirtError as exc:
        message = exc.get_error_message()
        undone = ""
        if not existed:
            undone = _undefine_quietly(conn, plan.domain)
            result.defined = False
        raise KvmBorgError(f"cannot start domain {plan.domain!r}: {message}; {undone}{kept}") from None
    result.started = True


def _undefine_quietly(conn: libvirt.virConnect, name: str) -> str:
    """Undefine a domain this restore defined, keeping its NVRAM and TPM state; return what happened, for the message."""
    dom = _lookup(conn, name)
    if dom is None:
        return ""
    try:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM)
    except libvirt.libvirtError as exc:
        return f"undefining it failed too ({exc.get_error_message()}); "
    return "it is not left defined; "


def _restored_xml(backend, archive: str, meta: dict, entries: dict[str, str], plan: RestorePlan,
                  options: RestoreOptions) -> tuple[str, str]:
    """Given the plan, return (the archived persistent XML, that XML rewritten for the restored domain)."""
    xml_archive_path = restore_plan.check_archive_path(meta["files"]["domain_xml"], "domain XML")
    if xml_archive_path not in entries:
        raise UsageError(f"archive {archive} lacks the domain XML {xml_archive_path}")
    if entries[xml_archive_path] != "file":
        raise UsageError(f"archive {archive} holds the domain XML {xml_archive_path} as a "
                         f"{entries[xml_archive_path]}, not a regular file; refused")
    try:
        archived_xml = read_bytes(backend, archive, xml_archive_path).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"archive {archive}: the domain XML {xml_archive_path} is not UTF-8") from None
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


def _define(conn: libvirt.virConnect, plan: RestorePlan, xml_text: str, overwrite: bool) -> None:
    existing = _lookup(conn, plan.domain)
    if existing is not None and existing.UUIDString() != plan.uuid:
        if not overwrite or existing.isActive():  # checked before; the state may have changed since
            raise RefusedError(f"domain {plan.domain!r} exists")
        existing.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM)
    conn.defineXML(xml_text)


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


def _restore_one_disk(ctx: Context, backend, repo: dict, archive: str, meta: dict, entries: dict[str, str],
                      options: RestoreOptions, started_at: float) -> RestoreResult:
    """--disk TARGET --to FILE|DEVICE|-: one disk's image as stored, to a file (sparse), into a block device
    (with --overwrite), or to stdout."""
    plan = restore_plan.plan_restore(meta, frozenset(entries), target_dir="/", disks=options.disks, with_xml=False,
                                     archive_types=entries, backing_formats_required=False)
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
        conn = ctx.connection.conn
        kind = _destination_kind(destination)
        if kind == "device":
            device = os.path.realpath(destination)
            if not options.overwrite:
                raise RefusedError(f"{destination} is a block device; give --overwrite to write the image into it")
            owner = _in_use_by(device, running_domain_files(conn))
            if owner is not None:
                raise RefusedError(f"{destination} belongs to the running domain {owner!r}; shut it off first")
            size = block_device_size(device)
            if size < disk.virtual_size:
                raise RefusedError(f"{destination} holds {size} bytes, less than the {disk.virtual_size} bytes of "
                                   f"disk {disk.target}")
            result.bytes_written = write_into_device(backend, archive, disk.image.archive_path, device)
        elif kind in ("file", "missing"):
            entry = RestoreFile(disk.image.archive_path, destination)
            check_refusals(conn, plan, [destination], define=False, overwrite=options.overwrite)
            result.bytes_written = restore_file(backend, archive, entry)
        else:
            raise UsageError(f"--to {destination} is a {kind}: give a regular file, a block device or -")
        result.disks[disk.target] = destination
    if disk.backing:
        result.warnings.append(f"disk {disk.target} has backing files; only its top image was restored")
    result.seconds = time.monotonic() - started_at
    return result


def _destination_kind(path: str) -> str:
    """Given a --to path, return "missing", "file", "device" (a block device, possibly through a symlink) or
    what else it is ("directory", "character device", "fifo"...)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing" if not os.path.islink(path) else "dangling symlink"
    if stat.S_ISBLK(st.st_mode):
        return "device"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISCHR(st.st_mode):
        return "character device"
    if stat.S_ISFIFO(st.st_mode):
        return "fifo"
    return "special file"


def block_device_size(path: str) -> int:
    """Given a block device, return its size in bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# --- the command -------------------------------------------------------------------------------


def add_arguments(subparsers) -> None:
    """Register `kvm-borg restore`."""
    parser = subparsers.add_parser("restore", help="restore a domain from an archive")
    parser.add_argument("domain", metavar="DOMAIN", help="the archived domain's name")
    parser.add_argument("--archive", metavar="NAME", default="latest", help="archive name, or latest (default)")
    parser.add_argument("--repo", metavar="NAME", help="repository to read (default: the first configured)")
    parser.add_argument("--host", metavar="NAME", help="take the archives made on host NAME (default: this host)")
    parser.add_argument("--target-dir", metavar="DIR", help="write the images and the XML here (default: the local domain's own images, else /var/lib/libvirt/images)")
    parser.add_argument("--name", metavar="NEW", help="restore as a copy: new name, UUID and MAC addresses")
    parser.add_argument("--define", action="store_true", help="define the restored domain in libvirt")
    parser.add_argument("--start", action="store_true", help="define and start the restored domain")
    parser.add_argument("--disk", action="append", default=[], metavar="TARGET", help="only this disk (repeatable)")
    parser.add_argument("--to", metavar="FILE", help="with one --disk: write its image to FILE, into a block device (with --overwrite), or - for stdout")
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
