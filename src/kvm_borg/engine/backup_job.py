"""libvirt pull-mode backup jobs and kvm-borg's checkpoints: the XML builders (pure) and the few
libvirt calls the bitmap method makes (begin, abort, list/validate/delete checkpoints).

A libvirt error leaves the calls as an EngineError ("libvirt: ..."). Facts measured on libvirt 9.0 /
QEMU 7.2 that shape them:
- QEMU itself binds the NBD socket and opens the scratch files, so the run's directory must be
  writable by the domain's DAC user (`qemu_owner`); libvirt creates the qcow2 scratch files (0600,
  owned by QEMU) and deletes them when the job ends, even when QEMU is killed; the socket file stays.
- A raw disk cannot carry a checkpoint bitmap ("unsupported for storage type raw"): `checkpoint='no'`.
- Network disks (`type='network'`) take part in a pull-mode job like file disks, given an explicit scratch
  file: a raw one as `checkpoint='no'`, a qcow2 one (over NBD) with a bitmap that QEMU keeps in the qcow2 on
  the server (tests/test_network_disk.py).
- REDEFINE|REDEFINE_VALIDATE of a checkpoint's own XML fails ("missing or broken bitmap") once its
  bitmap is gone or inconsistent (QEMU killed with SIGKILL); it needs a running domain. `virsh
  destroy` (SIGTERM) closes the image cleanly and keeps the bitmaps.
- A normal delete of a checkpoint whose bitmap is gone fails ("not found in backing chain");
  DELETE_METADATA_ONLY then removes libvirt's record. Neither normal delete nor a new checkpoint
  works on a shut-off domain.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import time
import xml.etree.ElementTree as ET

import libvirt

from kvm_borg.engine.libvirt_errors import engine_error, translated, translating
from kvm_borg.errors import EngineError

CHECKPOINT_PREFIX = "kvm-borg."
CHECKPOINT_RE = re.compile(r"^kvm-borg\.\d{8}T\d{6}Z\.[0-9a-f]{8}$")
ABORT_TIMEOUT = 60.0  # seconds libvirt may take to tear a backup job down after abortJob
_VALIDATE = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE


# --- pure builders ------------------------------------------------------------------------------


def new_checkpoint_name(now: float, suffix: str | None = None) -> str:
    """Given a time (seconds since the epoch) and optionally 8 hex digits, return a fresh checkpoint
    name `kvm-borg.<YYYYmmddTHHMMSSZ>.<8 hex>` (random digits unless given): unique, so a name libvirt
    lost track of is never reused ("Bitmap already exists"), and sorting by name sorts by time."""
    digits = suffix if suffix is not None else os.urandom(4).hex()  # secrets.token_hex, without importing secrets
    if not re.fullmatch(r"[0-9a-f]{8}", digits):
        raise ValueError(f"checkpoint suffix must be 8 hex digits, not {digits!r}")
    return f"{CHECKPOINT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}.{digits}"


def is_own_checkpoint(name: str) -> bool:
    """Given a checkpoint name, return whether kvm-borg made it (`kvm-borg.<ts>.<8 hex>`)."""
    return bool(CHECKPOINT_RE.match(name))


def backup_xml(socket: str, disks: list[tuple[str, str, str | None]]) -> str:
    """Given the unix socket the NBD server binds and [(target, scratch file, incremental-from
    checkpoint or None)], return the `<domainbackup mode='pull'>` XML: each listed disk is exported
    (export name = target; with a checkpoint also its bitmap `backup-<target>`) with
    `backupmode='incremental' incremental=CHECKPOINT` or `backupmode='full'`; disks not listed take
    no part."""
    root = ET.Element("domainbackup", mode="pull")
    ET.SubElement(root, "server", transport="unix", socket=socket)
    element = ET.SubElement(root, "disks")
    for target, scratch, incremental in disks:
        disk = ET.SubElement(element, "disk", name=target, backup="yes", type="file")
        if incremental:
            disk.set("backupmode", "incremental")
            disk.set("incremental", incremental)
        else:
            disk.set("backupmode", "full")
        ET.SubElement(disk, "scratch", file=scratch)
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, disks: list[tuple[str, str]]) -> str:
    """Given a checkpoint name and [(target, "bitmap" | "no")], return the `<domaincheckpoint>` XML."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    element = ET.SubElement(root, "disks")
    for target, mode in disks:
        if mode not in ("bitmap", "no"):
            raise ValueError(f"checkpoint mode of disk {target} must be 'bitmap' or 'no', not {mode!r}")
        ET.SubElement(element, "disk", name=target, checkpoint=mode)
    return ET.tostring(root, encoding="unicode")


def checkpoint_bitmap_disks(checkpoint_xml_text: str) -> set[str]:
    """Given a checkpoint's XML (as libvirt describes it), return the targets that carry a bitmap."""
    root = ET.fromstring(checkpoint_xml_text)
    return {d.get("name") for d in root.findall("./disks/disk") if d.get("checkpoint") == "bitmap" and d.get("name")}


def dac_label(domain_xml: str) -> str | None:
    """Given a running domain's live XML, return the label of its DAC security driver (e.g.
    "+64055:+64055", "libvirt-qemu:kvm"), or None when it has none (QEMU then runs as libvirtd's
    configured user)."""
    root = ET.fromstring(domain_xml)
    for label in root.findall("./seclabel"):
        if label.get("model") == "dac":
            text = (label.findtext("label") or "").strip()
            return text or None
    return None


def parse_owner(label: str) -> tuple[int, int]:
    """Given a DAC label "USER:GROUP" (each a name or "+N"), return (uid, gid); KeyError/ValueError
    when it names no such user or group."""
    user, _, group = label.partition(":")

    def number(text: str, lookup) -> int:
        return int(text[1:]) if text.startswith("+") else (int(text) if text.isdigit() else lookup(text))

    return (number(user, lambda n: pwd.getpwnam(n).pw_uid),
            number(group or user, lambda n: grp.getgrnam(n).gr_gid))


# --- libvirt calls ------------------------------------------------------------------------------


@translating
def qemu_owner(dom) -> tuple[int, int] | None:
    """Given a running domain, return the (uid, gid) its QEMU process runs as (from the DAC label of
    the live XML), or None when the XML names none."""
    label = dac_label(dom.XMLDesc(0))
    if label is None:
        return None
    try:
        return parse_owner(label)
    except (KeyError, ValueError):
        return None


@translating
def begin(dom, backup_xml_text: str, checkpoint_xml_text: str | None) -> None:
    """Given a running domain, start the pull-mode backup job and, in the same QEMU transaction, the
    checkpoint (None: no checkpoint)."""
    dom.backupBegin(backup_xml_text, checkpoint_xml_text, 0)


def job_active(dom) -> bool:
    """Given a domain, return whether a backup job runs on it (False when it is shut off or gone)."""
    try:
        if not dom.isActive():
            return False
        stats = dom.jobStats(0)
    except libvirt.libvirtError:
        return False
    return (stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
            and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP)


def abort(dom, timeout: float = ABORT_TIMEOUT) -> bool:
    """Given a domain, end its backup job if one runs and wait (at most `timeout` s) until libvirt has
    finished it: abortJob returns before the job is torn down (its scratch files deleted), and until
    then a checkpoint delete or a new job is refused. Return whether there was a job to end; an
    EngineError when it could not be ended."""
    if not job_active(dom):
        return False
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if not job_active(dom):  # ended meanwhile (QEMU exited, the guest shut down)
            return True
        raise engine_error(exc) from exc
    deadline = time.monotonic() + timeout
    while job_active(dom):
        if time.monotonic() > deadline:
            raise EngineError(f"libvirt: the backup job did not end within {timeout:g}s of abortJob")
        time.sleep(0.05)
    return True


@translating
def own_checkpoints(dom) -> list[str]:
    """Given a domain, return the names of kvm-borg's checkpoints on it (oldest first); others' are
    never listed."""
    return sorted(c.getName() for c in dom.listAllCheckpoints(0) if is_own_checkpoint(c.getName()))


def lookup_checkpoint(dom, name: str):
    """Given a domain and a checkpoint name, return libvirt's checkpoint object, or None when the domain has
    none of that name (any other libvirt error is an EngineError)."""
    try:
        return dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return None
        raise engine_error(exc) from exc


def checkpoint_description(dom, name: str) -> str | None:
    """Given a domain and a checkpoint name, return the checkpoint's XML, or None when it has none of
    that name."""
    checkpoint = lookup_checkpoint(dom, name)
    if checkpoint is None:
        return None
    with translated():
        return checkpoint.getXMLDesc(0)


def checkpoint_problem(dom, name: str) -> str | None:
    """Given a running domain and a checkpoint name, return why an incremental backup from it is
    impossible ("checkpoint X missing", "bitmap of checkpoint X unusable (...)"), or None when
    libvirt validates its bitmaps (REDEFINE|REDEFINE_VALIDATE of its own XML)."""
    description = checkpoint_description(dom, name)
    if description is None:
        return f"checkpoint {name} missing"
    try:
        dom.checkpointCreateXML(description, _VALIDATE)
    except libvirt.libvirtError as exc:
        return f"bitmap of checkpoint {name} unusable ({exc.get_error_message()}; was QEMU killed?)"
    return None


def delete_checkpoint(dom, name: str) -> str | None:
    """Given a domain and a checkpoint name, delete the checkpoint with its bitmaps (needs a running
    domain), or only libvirt's record of it when its bitmap is gone; return what was done ("deleted",
    "deleted metadata only"), None when there was no such checkpoint. On a shut-off domain nothing is
    deleted ("kept: the domain is not running"): only libvirt's record could go, leaving the bitmap
    in the image; the next run's release deletes it."""
    checkpoint = lookup_checkpoint(dom, name)
    if checkpoint is None:
        return None
    with translated():
        active = dom.isActive()
    if not active:
        return "kept: the domain is not running"
    try:
        checkpoint.delete(0)
        return "deleted"
    except libvirt.libvirtError as exc:
        first = exc
    try:
        checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError:
        raise engine_error(first) from first
    return "deleted metadata only"
