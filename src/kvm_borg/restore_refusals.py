"""What a restore must refuse before anything changes: files of a running domain, existing files without
--overwrite, an existing or running domain, a UUID another domain holds, an unfinished backup in
the journal, a symlink on the way into libvirt's NVRAM and TPM directories.

The decisions are pure functions of what this host says (the running domains' files, lstat, the
journal); the libvirt questions go through kvm_borg.engine.lifecycle.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from kvm_borg import restore_plan
from kvm_borg.engine import lifecycle
from kvm_borg.engine.domain_xml import firmware_files, parse_disks
from kvm_borg.errors import RefusedError
from kvm_borg.restore_plan import RestorePlan


def files_of(xml: str, uuid: str) -> list[str]:
    """Given a running domain's live XML and UUID, return the host paths it uses: images, backing files,
    NVRAM, and its TPM state directory."""
    paths = []
    for disk in parse_disks(xml):
        paths += [p for p in (disk.source, *disk.backing_chain) if p]
    nvram = firmware_files(xml).get("nvram")
    if nvram:
        paths.append(nvram)
    if ET.fromstring(xml).find("./devices/tpm/backend[@type='emulator']") is not None:
        paths.append(posixpath.join(restore_plan.TPM_STATE_ROOT, uuid))
    return paths


def running_domain_files(conn) -> dict[str, str]:
    """Given a connection, return {real path: domain name} of every file a running domain uses."""
    return {os.path.realpath(path): name
            for name, uuid, xml in lifecycle.active_domains(conn) for path in files_of(xml, uuid)}


def in_use_by(path: str, used: dict[str, str]) -> str | None:
    """Given a path and running_domain_files, return the name of the running domain that uses it (the path
    itself or a directory above it), or None."""
    real = os.path.realpath(path)
    for used_path, name in used.items():
        if real == used_path or real.startswith(used_path.rstrip("/") + "/"):
            return name
    return None


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


def check_refusals(conn, plan: RestorePlan, destinations: list[str], *, define: bool, overwrite: bool) -> None:
    """Given a connection, the plan, the files it writes, and --define/--overwrite, refuse (RefusedError,
    nothing changed) what a restore must not do without --overwrite, or at all."""
    used = running_domain_files(conn)
    for path in destinations:
        owner = in_use_by(path, used)
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
        existing = lifecycle.facts(conn, plan.domain)
        if existing is not None:
            if not overwrite:
                raise RefusedError(f"domain {plan.domain!r} exists; give --overwrite to replace it, or --name NEW")
            if existing.active:
                raise RefusedError(f"domain {plan.domain!r} is running; shut it off first")
        by_uuid = lifecycle.facts_by_uuid(conn, plan.uuid)
        if by_uuid is not None and by_uuid.name != plan.domain:
            raise RefusedError(
                f"domain {by_uuid.name!r} has the archived UUID {plan.uuid}; restore with --name NEW for a copy"
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


def destination_kind(path: str) -> str:
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
