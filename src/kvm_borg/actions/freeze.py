"""`kvm-borg freeze --expose DIR` / `kvm-borg thaw`: hand frozen domains to another backup tool (borgmatic).

`freeze` snapshots each domain exactly like `backup` does (the libvirt engine's SnapshotSource,
journaled before anything changes) and exposes, read-only and at stable paths:

    DIR/<domain>/meta.json, domain.xml, domain-live.xml (+ NVRAM, TPM state, network/pool XML)
    DIR/<domain>/disks/<target>.<format>             read-only bind mount of the frozen image
    DIR/<domain>/disks/<target>.backing<N>.<format>  ... and of each backing file below it

meta.json names those paths as the images' places in the archive, so `kvm-borg restore` works on
an archive made by borgmatic. The paths do not change from run to run (borg's files cache).

`thaw` unmounts, merges the overlays back, removes DIR/<domain> and the journal entry; it is
idempotent and safe after a failed or partial freeze. The journal entry (source
"kvm-borg-freeze") plus a record of the exposure under state_dir/exposures/ let `kvm-borg
recover` do the same after a crash: this module is also the plugin that recovers such entries.

A shut-off domain is exposed as it is (no snapshot). If its images change before `thaw` (it was
started), thaw warns that the archive may be inconsistent.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import uuid as uuid_module
from pathlib import Path

import libvirt

from kvm_borg import journal, metadata, mountinfo
from kvm_borg.engine import host_state
from kvm_borg.actions.common import Context, ensure_state_dir, print_json, resolve_domains
from kvm_borg.atomic import write_atomic
from kvm_borg.engine.libvirt_snapshot import RecoveryReport, SnapshotSource, bring_back_to_base, frozen_disk
from kvm_borg.engine.planning import handle_for, make_plan
from kvm_borg.errors import KvmBorgError, RefusedError, UsageError
from kvm_borg.hookspecs import hookimpl
from kvm_borg.locks import domain_lock
from kvm_borg.models import FreezeResult
from kvm_borg.plugins import notify

log = logging.getLogger(__name__)

FREEZE_SOURCE = "kvm-borg-freeze"
DISKS_DIR = "disks"
MARKER_NAME = ".kvm-borg-freeze"  # in DIR/<domain>: this run's id and every path freeze created there


# --- pure: where things are exposed -------------------------------------------------------------


def exposure_paths(domain_dir: Path, disks) -> dict[str, str]:
    """Given DIR/<domain> and the FrozenDisks, return {host path: exposed path} for every image and backing file."""
    paths = {}
    for disk in disks:
        paths[disk.path] = str(domain_dir / DISKS_DIR / f"{disk.target}.{disk.driver_type}")
        for n, backing in enumerate(disk.backing_chain, start=1):
            paths.setdefault(backing, str(domain_dir / DISKS_DIR / f"{disk.target}.backing{n}"))
    return paths


def point_meta_at_exposure(meta: dict, exposed: dict[str, str]) -> None:
    """Given meta.json and {host path: exposed path}, make its images' archive paths the exposed ones."""
    for disk in meta["disks"]:
        disk["archive_path"] = metadata.relative_archive_path(exposed[disk["read_from"]])
        for backing in disk["backing_chain"]:
            backing["archive_path"] = metadata.relative_archive_path(exposed[backing["path"]])
    meta["exposed"] = True


# --- the exposure record and bind mounts --------------------------------------------------------


def _records_dir(settings) -> Path:
    return settings.state_dir / "exposures"


def _write_record(settings, record: dict) -> None:
    directory = _records_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{record['uuid']}.json"
    write_atomic(path, json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8"), 0o600)


def _read_records(settings) -> list[dict]:
    directory = _records_dir(settings)
    if not directory.is_dir():
        return []
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable exposure record %s: %s", path, exc)
    return records


def _remove_record(settings, uuid: str) -> None:
    try:
        (_records_dir(settings) / f"{uuid}.json").unlink()
    except FileNotFoundError:
        pass


def mount_points() -> set[str]:
    """Return the mount points of this mount namespace (from /proc/self/mountinfo, escapes decoded)."""
    return mountinfo.mount_points()


def _bind_read_only(source: str, target: str) -> None:
    Path(target).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o400)
    os.close(fd)
    proc = subprocess.run(["mount", "--bind", "-o", "ro", source, target], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise KvmBorgError(f"cannot expose {source} at {target}: {proc.stderr.strip() or 'mount failed'}")


# --- the marker: what `freeze` created in DIR/<domain>, so thaw removes that and nothing else -----


def created_paths(domain_dir: Path, mount_targets) -> list[str]:
    """Given a freshly written DIR/<domain> and the bind mount targets still to be created in it,
    return every path freeze created there, relative to it (files and directories)."""
    found = set()
    for root, dirs, files in os.walk(domain_dir):
        for name in [*dirs, *files]:
            found.add(os.path.relpath(os.path.join(root, name), domain_dir))
    for target in mount_targets:
        relative = Path(os.path.relpath(target, domain_dir))
        found.update(str(parent) for parent in relative.parents if str(parent) != ".")
        found.add(str(relative))
    return sorted(found)


def _write_marker(domain_dir: Path, marker: dict) -> None:
    """Write DIR/<domain>/.kvm-borg-freeze (root-only, never through a symlink)."""
    path = domain_dir / MARKER_NAME
    tmp = domain_dir / (MARKER_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_marker(domain_dir: Path) -> dict | None:
    """Return the freeze marker of DIR/<domain> ({run, domain, uuid, files}), or None if there is
    none, it is not a regular file, or it is unreadable."""
    path = domain_dir / MARKER_NAME
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("run"), str) or not isinstance(data.get("files"), list):
        return None
    return data


def _is_mount(path: Path, mounted: set[str]) -> bool:
    return str(path) in mounted or os.path.ismount(path)


def remove_created(domain_dir: Path, files: list, mounted: set[str], report: RecoveryReport) -> None:
    """Given DIR/<domain> and the paths its marker lists, remove those (deepest first), the marker and
    DIR/<domain> itself when nothing else is left; never a mount point, never anything not listed."""
    if _is_mount(domain_dir, mounted):
        raise KvmBorgError(f"{domain_dir} is a mount point; not removing anything in it")
    for relative in sorted(files, key=lambda r: (str(r).count("/"), str(r)), reverse=True):
        if not isinstance(relative, str) or os.path.isabs(relative) or ".." in Path(relative).parts:
            continue  # not a path freeze writes
        path = domain_dir / relative
        if not os.path.lexists(path):
            continue
        if _is_mount(path, mounted):
            raise KvmBorgError(f"{path} is still a mount point; not removing {domain_dir}")
        if path.is_dir() and not path.is_symlink():
            try:
                path.rmdir()
            except OSError:  # holds something freeze did not put there
                pass
        else:
            path.unlink()
    (domain_dir / MARKER_NAME).unlink(missing_ok=True)
    try:
        domain_dir.rmdir()
        report.did(f"removed {domain_dir}")
    except OSError:
        report.warn(f"left {domain_dir}: it holds files `kvm-borg freeze` did not create")


def remove_exposure(record: dict, report: RecoveryReport) -> None:
    """Given an exposure record, unmount its images and remove what freeze created in DIR/<domain>
    (the paths its marker lists, if the marker is this run's); idempotent. A DIR/<domain> without
    this run's marker is left alone (an empty one is removed)."""
    mounted = mount_points()
    for target in record.get("mounts", []):
        while target in mounted:
            proc = subprocess.run(["umount", target], capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise KvmBorgError(f"cannot unmount {target}: {proc.stderr.strip()} (still read by a backup?)")
            report.did(f"unmounted {target}")
            mounted = mount_points()
    domain_dir = Path(record["domain_dir"])
    if not domain_dir.is_dir() or domain_dir.is_symlink():
        return
    marker = read_marker(domain_dir)
    if marker is None or marker["run"] != record.get("marker"):
        if not _is_mount(domain_dir, mounted) and not any(domain_dir.iterdir()):
            domain_dir.rmdir()  # created for this run before its marker was written
            report.did(f"removed {domain_dir}")
        else:
            report.warn(f"left {domain_dir}: it carries no marker of this freeze (not created by it)")
        return
    remove_created(domain_dir, marker["files"], mounted, report)


def _image_stamps(paths) -> dict[str, list[int]]:
    stamps = {}
    for path in paths:
        try:
            st = os.stat(path)
            stamps[path] = [st.st_mtime_ns, st.st_size]
        except OSError:
            stamps[path] = [0, 0]
    return stamps


# --- freeze -------------------------------------------------------------------------------------


def _innermost(source):
    while hasattr(source, "inner"):
        source = source.inner
    return source


def freeze_domain(ctx: Context, name: str, expose_dir: Path, excluded: list[str]) -> dict:
    """Given a domain name and DIR, freeze it and expose it under DIR/<name>; return {domain, ok, ...}.

    On any failure everything done so far is undone (unmounted, merged back, removed)."""
    settings = ctx.settings
    outcome = {"domain": name, "ok": False, "consistency": None, "path": None, "warnings": [], "error": None}
    try:
        handle = handle_for(ctx.connection, name)
        ensure_state_dir(settings)
        with domain_lock(settings.lock_dir, handle.uuid, name):
            _freeze_locked(ctx, handle, expose_dir, excluded, outcome)
    except Exception as exc:  # any type: reported for this domain, the others are still frozen
        outcome["error"] = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        if not isinstance(exc, (KvmBorgError, libvirt.libvirtError, OSError)):
            outcome["error"] = f"unexpected error: {type(exc).__name__}: {exc}"
            log.debug("traceback of the unexpected error", exc_info=True)  # shown with -vv
        log.error("domain '%s': freeze failed: %s", name, outcome["error"])
    return outcome


def _freeze_locked(ctx: Context, handle, expose_dir: Path, excluded: list[str], outcome: dict) -> None:
    settings, name = ctx.settings, handle.name
    timestamp = metadata.utc_timestamp()
    plan = make_plan(handle, settings, excluded, timestamp)
    domain_dir = expose_dir / name
    if os.path.lexists(domain_dir):
        raise RefusedError(f"domain '{name}': {domain_dir} exists (left by an earlier freeze?): "
                           f"run `kvm-borg thaw --expose {expose_dir}` first")
    record = {"domain": name, "uuid": plan.uuid, "expose_dir": str(expose_dir), "domain_dir": str(domain_dir),
              "running": plan.running, "mounts": [], "images": {}, "marker": uuid_module.uuid4().hex}
    _write_record(settings, record)  # before anything changes, like the journal
    source = None
    entry = None
    try:
        if plan.running:
            source = ctx.pm.hook.kvm_borg_frozen_source(domain=handle, plan=plan, settings=settings)
            inner = _innermost(source)
            if not isinstance(inner, SnapshotSource):
                raise RefusedError(f"domain '{name}': freeze works with the built-in snapshot source only")
            inner.entry.source = FREEZE_SOURCE  # recover/thaw know to remove the exposure too
            entry = inner.entry
            notify(ctx.pm, "kvm_borg_before_snapshot", domain=name, disks=list(plan.disks), quiesce=plan.quiesce)
            freeze = source.freeze()
            notify(ctx.pm, "kvm_borg_after_snapshot", domain=name, disks=freeze.disks, quiesced=freeze.quiesced,
                   seconds=freeze.freeze_seconds)
        else:
            entry = journal.Entry(domain=name, uuid=plan.uuid, disks=[], source=FREEZE_SOURCE, stage="exposed")
            journal.write_entry(settings.journal_dir, entry)
            freeze = FreezeResult(disks=[frozen_disk(d, d.source) for d in plan.disks], quiesced=False,
                                  consistency="offline")
        outcome["consistency"] = freeze.consistency
        outcome["warnings"].extend(freeze.warnings)
        exposed = exposure_paths(domain_dir, freeze.disks)
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        persistent_xml = handle.dom.XMLDesc(flags | libvirt.VIR_DOMAIN_XML_INACTIVE)
        live_xml = handle.dom.XMLDesc(flags) if plan.running else None
        conn = handle.connection.conn
        version = conn.getLibVersion(), conn.getVersion()
        dotted = [f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}" for n in version]
        meta = metadata.build_meta(
            plan, freeze, archive=f"{name}-{timestamp}", timestamp=timestamp, host=settings.hostname,
            libvirt_version=dotted[0], qemu_version=dotted[1], persistent=bool(handle.dom.isPersistent()),
            staging_dir=str(domain_dir), has_live_xml=live_xml is not None,
        )
        captured = host_state.capture(conn, plan.uuid, persistent_xml, live_xml, [d.source for d in plan.disks],
                                      str(domain_dir))
        host_state.add_to_meta(meta, captured, {d.target: host_state.file_owner(d.source) for d in plan.disks})
        outcome["warnings"].extend(f"domain '{name}': not exposed: {piece}" for piece in captured.missing)
        point_meta_at_exposure(meta, exposed)
        metadata.write_staging(domain_dir, meta, persistent_xml, live_xml, captured.staged)
        _write_marker(domain_dir, {"run": record["marker"], "domain": name, "uuid": plan.uuid,
                                   "files": created_paths(domain_dir, exposed.values())})
        record["mounts"] = list(exposed.values())
        record["images"] = _image_stamps(exposed) if not plan.running else {}
        _write_record(settings, record)
        for host_path, target in exposed.items():
            _bind_read_only(host_path, target)
        if source is not None and hasattr(source, "mark_stage"):
            source.mark_stage("exposed")
        outcome.update(ok=True, path=str(domain_dir))
        for warning in outcome["warnings"]:
            log.warning("%s", warning)
        log.info("domain '%s': frozen (%s), exposed at %s", name, freeze.consistency, domain_dir)
    except BaseException:
        report = RecoveryReport(name)
        try:
            remove_exposure(record, report)
        finally:
            if entry is not None and journal.read_entry(settings.journal_dir, plan.uuid) is not None:
                bring_back_to_base(entry, handle.connection, settings)
            _remove_record(settings, plan.uuid)
        raise


# --- thaw and recovery --------------------------------------------------------------------------


def thaw_entry(entry: journal.Entry | None, record: dict | None, connection, settings) -> RecoveryReport:
    """Given a freeze journal entry and/or its exposure record, unmount and remove the exposure, merge the
    overlays back and drop both; return the report (a warning when an exposed shut-off domain changed)."""
    name = entry.domain if entry is not None else record["domain"]
    report = RecoveryReport(name)
    if record is not None:
        remove_exposure(record, report)
        for path, stamp in (record.get("images") or {}).items():
            if _image_stamps([path])[path] != stamp:
                report.warn(f"image {path} changed while it was exposed (the domain was started?): the archive "
                            "made from the exposure may be inconsistent")
    if entry is not None:
        merged = bring_back_to_base(entry, connection, settings)
        report.actions.extend(merged.actions)
        report.warnings.extend(merged.warnings)
    if record is not None:
        _remove_record(settings, record["uuid"])
    return report


def run_thaw(ctx: Context, expose_dir: Path | None, names: list[str]) -> list[dict]:
    """Given DIR (None: every exposure) and domain names (empty: all), thaw what `freeze` left; idempotent."""
    settings = ctx.settings
    entries = {e.uuid: e for e in journal.list_entries(settings.journal_dir) if e.source == FREEZE_SOURCE}
    records = {r["uuid"]: r for r in _read_records(settings)}
    outcomes = []
    for uuid in list(dict.fromkeys([*records, *entries])):
        record, entry = records.get(uuid), entries.get(uuid)
        name = entry.domain if entry is not None else record["domain"]
        if names and name not in names:
            continue
        if expose_dir is not None and record is not None and Path(record["expose_dir"]) != expose_dir:
            continue
        outcome = {"domain": name, "ok": False, "actions": [], "warnings": [], "error": None}
        try:
            with domain_lock(settings.lock_dir, uuid, name):
                fresh_entry = journal.read_entry(settings.journal_dir, uuid)
                fresh_record = next((r for r in _read_records(settings) if r["uuid"] == uuid), None)
                report = thaw_entry(fresh_entry, fresh_record, ctx.connection, settings)
                outcome.update(ok=True, actions=report.actions, warnings=report.warnings)
        except KvmBorgError as exc:
            outcome["error"] = str(exc)
            log.error("domain '%s': thaw failed: %s", name, exc)
        except Exception as exc:  # any type: reported for this domain, the others are still thawed
            outcome["error"] = (exc.get_error_message() if isinstance(exc, libvirt.libvirtError)
                                else f"{type(exc).__name__}: {exc}")
            log.error("domain '%s': thaw failed: %s", name, outcome["error"])
            log.debug("traceback", exc_info=True)
        outcomes.append(outcome)
    if expose_dir is not None and expose_dir.is_dir():
        _remove_stale_domain_dirs(expose_dir, settings)
    return outcomes


def _remove_stale_domain_dirs(expose_dir: Path, settings) -> None:
    """Remove what freeze created in DIR/<domain> directories that carry its marker, that no exposure
    record owns, and that are not (and hold no) mount points. Foreign directories are never touched."""
    owned = {Path(r["domain_dir"]) for r in _read_records(settings)}
    mounted = mount_points()
    for child in expose_dir.iterdir():
        if child in owned or child.is_symlink() or not child.is_dir() or _is_mount(child, mounted):
            continue
        marker = read_marker(child)
        if marker is None:
            continue
        report = RecoveryReport(marker.get("domain") or child.name)
        try:
            remove_created(child, marker["files"], mounted, report)
        except KvmBorgError as exc:
            log.warning("%s", exc)


@hookimpl
def kvm_borg_recover_entry(entry, connection, settings):
    """Complete an entry `kvm-borg freeze` left: remove the exposure, then merge back like any backup."""
    if entry.source != FREEZE_SOURCE:
        return None
    record = next((r for r in _read_records(settings) if r["uuid"] == entry.uuid), None)
    return thaw_entry(entry, record, connection, settings)


# --- the command line ---------------------------------------------------------------------------


def expose_dir_from(value: str) -> Path:
    """Given --expose, return it absolute with symlinks resolved (mount points are listed that way)."""
    return Path(os.path.realpath(value))


def add_arguments(subparsers) -> None:
    """Register `kvm-borg freeze` and `kvm-borg thaw`."""
    freeze = subparsers.add_parser("freeze", help="snapshot domains and expose the frozen images read-only under DIR")
    freeze.add_argument("domains", nargs="*", metavar="DOMAIN")
    freeze.add_argument("--all", action="store_true", help="every domain the config's `domains:` selects")
    freeze.add_argument("--expose", required=True, metavar="DIR", help="directory to expose the domains under")
    freeze.add_argument("--exclude-disk", action="append", default=[], metavar="TARGET",
                        help="leave this disk target out (repeatable)")
    freeze.add_argument("--json", action="store_true")
    freeze.set_defaults(run=freeze_from_args)
    thaw = subparsers.add_parser("thaw", help="undo `freeze`: unmount, merge back, clean up (idempotent)")
    thaw.add_argument("domains", nargs="*", metavar="DOMAIN")
    thaw.add_argument("--expose", metavar="DIR", help="only what was exposed under DIR")
    thaw.add_argument("--json", action="store_true")
    thaw.set_defaults(run=thaw_from_args)


def freeze_from_args(ctx: Context, args) -> int:
    expose_dir = expose_dir_from(args.expose)
    if expose_dir == Path("/") or (expose_dir.exists() and not expose_dir.is_dir()):
        raise UsageError(f"--expose {args.expose}: expected a directory")
    domains = resolve_domains(ctx, args.domains, args.all)
    expose_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    outcomes = []
    for name in domains:
        excluded = ctx.settings.domains["disks_exclude"].get(name, []) + args.exclude_disk
        outcomes.append(freeze_domain(ctx, name, expose_dir, excluded))
    if args.json:
        print_json(outcomes)
    else:
        for o in outcomes:
            print(f"{o['domain']}: " + (f"frozen ({o['consistency']}), exposed at {o['path']}" if o["ok"]
                                        else f"FAILED: {o['error']}"))
            for warning in o["warnings"]:
                print(f"  warning: {warning}")
    if any(not o["ok"] for o in outcomes):
        return 2
    return 1 if any(o["warnings"] for o in outcomes) else 0


def thaw_from_args(ctx: Context, args) -> int:
    outcomes = run_thaw(ctx, expose_dir_from(args.expose) if args.expose else None, args.domains)
    if args.json:
        print_json(outcomes)
    else:
        if not outcomes:
            print("nothing to thaw")
        for o in outcomes:
            print(f"{o['domain']}: " + ("thawed" if o["ok"] else f"FAILED: {o['error']}"))
            for warning in o["warnings"]:
                print(f"  warning: {warning}")
    if any(not o["ok"] for o in outcomes):
        return 2
    return 1 if any(o["warnings"] for o in outcomes) else 0
