"""The live restore's libvirt calls: QEMU's user, the pull of a disk's backing data into its image
(libvirt blockPull), its progress and speed, and what a guest paused on a read error needs.

A libvirt error leaves this module as an EngineError. Domains are the opaque objects
kvm_borg.engine.lifecycle returns.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt

from kvm_borg.engine.libvirt_errors import translated
from kvm_borg.live_restore_plan import parse_dac_label, targets_with_backing


def qemu_ids(conn) -> tuple[int, int] | None:
    """Given a connection, return (uid, gid) QEMU runs as (the DAC base label of the KVM domains), or None
    when libvirt does not say (then only root may read what the live restore exposes)."""
    with translated():
        caps = ET.fromstring(conn.getCapabilities())
    for model in caps.findall("./host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.findall("baselabel"):
            if label.get("type") in ("kvm", "qemu") and label.text:
                ids = parse_dac_label(label.text)
                if ids is not None:
                    return ids
    return None


def start_pull(dom, target: str, bandwidth: int = 0) -> None:
    """Given a running domain, a disk target and a bandwidth in bytes/s (0: unlimited), start pulling the
    disk's backing data into its image (libvirt drops the backing file when the job completes)."""
    flags = libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES if bandwidth else 0
    with translated():
        dom.blockPull(target, bandwidth, flags)


def pull_progress(dom, target: str) -> tuple[int, int] | None:
    """Given a domain and a disk target, return (bytes done, bytes in all) of its running block job, or None."""
    with translated():
        info = dom.blockJobInfo(target, 0)
    if not info:
        return None
    return int(info.get("cur", 0)), int(info.get("end", 0))


def set_pull_speed(dom, target: str, bandwidth: int) -> None:
    """Given a domain, a disk target with a running pull and a bandwidth in bytes/s (0: unlimited), set it."""
    with translated():
        dom.blockJobSetSpeed(target, bandwidth, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)


def backed_targets(dom) -> set[str]:
    """Given a running domain, return the disk targets that still have a backing file (pull not done)."""
    with translated():
        return targets_with_backing(dom.XMLDesc(0))


def is_active(dom) -> bool:
    """Given a domain, return whether it runs (also paused)."""
    with translated():
        return bool(dom.isActive())


def paused_by_io_error(dom) -> bool:
    """Given a domain, return whether it is paused because a disk read or write failed."""
    with translated():
        state, reason = dom.state()
    return state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR


def resume(dom) -> None:
    """Given a paused domain, let it run again (a failed request is retried)."""
    with translated():
        dom.resume()


def restart_process(dom) -> None:
    """Given a running (or paused) domain, save its state (managed save), then start it from that state in a
    new QEMU process, which opens every image again (the old process's files on a dead mount stay dead);
    the guest continues where it was, in the state it was (paused stays paused)."""
    with translated():
        dom.managedSave(0)
        dom.create()


def flush_disks(dom) -> bool:
    """Given a domain whose pull just completed, make QEMU write the pulled data's metadata to the images
    (QEMU flushes every disk when it stops the guest: a pause of milliseconds, then it runs on); return
    whether it was done (False for a domain not running, which the pause would not flush now)."""
    with translated():
        if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
            return False
        dom.suspend()
        dom.resume()
    return True
