"""The exposure `kvm-borg freeze --expose DIR` leaves for an outside reader (borgmatic), and its undoing.

    DIR/<domain>/meta.json, domain.xml, domain-live.xml (+ NVRAM, TPM state, network/pool XML)
    DIR/<domain>/disks/<target>.<format>             read-only bind mount of the frozen image
    DIR/<domain>/disks/<target>.backing<N>.<format>  ... and of each backing file below it
    DIR/<domain>/disks/<target>/                     read-only bind mount of a segmented disk's
                                                     directory (the bitmap method's segment view)

A record under state_dir/exposures/<uuid>.json is written before anything is exposed; the marker
DIR/<domain>/.kvm-borg-freeze lists every path freeze created there, so undoing removes exactly
those (never a mount point, never anything else). Used by `kvm-borg freeze`/`thaw` and by the
built-in plugin kvm_borg.default_plugins.freeze_exposure (`kvm-borg recover`).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from pathlib import Path

from kvm_borg.atomic import write_atomic
from kvm_borg.models import RecoveryReport
from kvm_borg.errors import KvmBorgError

log = logging.getLogger(__name__)

OWNER = "kvm-borg-freeze"  # the FrozenSource owner (journal entry `owner`) of a frozen, exposed domain
DISKS_DIR = "disks"
MARKER_NAME = ".kvm-borg-freeze"  # in DIR/<domain>: this run's id and every path freeze created there


def exposure_paths(domain_dir: Path, disks) -> dict[str, str]:
    """Given DIR/<domain> and the FrozenDisks, return {host path: exposed path} for every image and backing file."""
    paths = {}
    for disk in disks:
        if disk.layout == "segments":
            paths[disk.path] = str(domain_dir / DISKS_DIR / disk.target)
            continue
        paths[disk.path] = str(domain_dir / DISKS_DIR / f"{disk.target}.{disk.driver_type}")
        for n, backing in enumerate(disk.backing_chain, start=1):
            paths.setdefault(backing, str(domain_dir / DISKS_DIR / f"{disk.target}.backing{n}"))
    return paths


# --- the exposure record and bind mounts --------------------------------------------------------


def records_dir(settings) -> Path:
    return settings.state_dir / "exposures"


def write_record(settings, record: dict) -> None:
    directory = records_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{record['uuid']}.json"
    write_atomic(path, json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8"), 0o600)


def read_records(settings) -> list[dict]:
    directory = records_dir(settings)
    if not directory.is_dir():
        return []
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable exposure record %s: %s", path, exc)
    return records


def remove_record(settings, uuid: str) -> None:
    try:
        (records_dir(settings) / f"{uuid}.json").unlink()
    except FileNotFoundError:
        pass


def mount_points() -> set[str]:
    """Return the mount points of this mount namespace (from /proc/self/mountinfo, escapes decoded)."""
    from kvm_borg import mountinfo  # imported here: a backup registers the plugin that imports this module

    return mountinfo.mount_points()


def bind_read_only(source: str, target: str) -> None:
    """Given a host file or directory and a path in DIR/<domain>, create the mount point (a file or a
    directory, like the source) and bind-mount the source there read-only; KvmBorgError if mount fails."""
    Path(target).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.path.isdir(source):
        os.makedirs(target, mode=0o700, exist_ok=True)
    else:
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


def write_marker(domain_dir: Path, marker: dict) -> None:
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


def is_mount(path: Path, mounted: set[str]) -> bool:
    return str(path) in mounted or os.path.ismount(path)


def remove_created(domain_dir: Path, files: list, mounted: set[str], report: RecoveryReport) -> None:
    """Given DIR/<domain> and the paths its marker lists, remove those (deepest first), the marker and
    DIR/<domain> itself when nothing else is left; never a mount point, never anything not listed."""
    if is_mount(domain_dir, mounted):
        raise KvmBorgError(f"{domain_dir} is a mount point; not removing anything in it")
    for relative in sorted(files, key=lambda r: (str(r).count("/"), str(r)), reverse=True):
        if not isinstance(relative, str) or os.path.isabs(relative) or ".." in Path(relative).parts:
            continue  # not a path freeze writes
        path = domain_dir / relative
        if not os.path.lexists(path):
            continue
        if is_mount(path, mounted):
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
        if not is_mount(domain_dir, mounted) and not any(domain_dir.iterdir()):
            domain_dir.rmdir()  # created for this run before its marker was written
            report.did(f"removed {domain_dir}")
        else:
            report.warn(f"left {domain_dir}: it carries no marker of this freeze (not created by it)")
        return
    remove_created(domain_dir, marker["files"], mounted, report)


def image_stamps(paths) -> dict[str, list[int]]:
    stamps = {}
    for path in paths:
        try:
            st = os.stat(path)
            stamps[path] = [st.st_mtime_ns, st.st_size]
        except OSError:
            stamps[path] = [0, 0]
    return stamps


def record_for(settings, uuid: str) -> dict | None:
    """Given the Settings and a domain UUID, return its exposure record, or None."""
    return next((r for r in read_records(settings) if r["uuid"] == uuid), None)


def withdraw(record: dict, report: RecoveryReport) -> None:
    """Given an exposure record, unmount and remove the exposure (remove_exposure) and warn in `report`
    when an exposed shut-off domain's image changed meanwhile (it was started)."""
    remove_exposure(record, report)
    for path, stamp in (record.get("images") or {}).items():
        if image_stamps([path])[path] != stamp:
            report.warn(f"image {path} changed while it was exposed (the domain was started?): the archive "
                        "made from the exposure may be inconsistent")


def remove_stale_domain_dirs(expose_dir: Path, settings) -> None:
    """Remove what freeze created in DIR/<domain> directories that carry its marker, that no exposure
    record owns, and that are not (and hold no) mount points. Foreign directories are never touched."""
    owned = {Path(r["domain_dir"]) for r in read_records(settings)}
    mounted = mount_points()
    for child in expose_dir.iterdir():
        if child in owned or child.is_symlink() or not child.is_dir() or is_mount(child, mounted):
            continue
        marker = read_marker(child)
        if marker is None:
            continue
        report = RecoveryReport(marker.get("domain") or child.name)
        try:
            remove_created(child, marker["files"], mounted, report)
        except KvmBorgError as exc:
            log.warning("%s", exc)
