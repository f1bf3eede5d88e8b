"""Guest writes/reads through the running VM's block layer via HMP ``qemu-io``.

``qemu-io`` on the monitor acts on the disk's BlockBackend, i.e. on whatever is the
*active layer* right now (an overlay while a snapshot-based backup runs), exactly
like a guest write.  Its output goes to QEMU's stdout, which libvirt sends to the
domain log (/var/log/libvirt/qemu/<name>.log), not to the monitor reply; so the
helpers confirm the result by reading the new part of that log.
"""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import libvirt_qemu

from .domains import disk_aliases

QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


class HmpError(RuntimeError):
    pass


def domain_log(dom: libvirt.virDomain) -> Path:
    return QEMU_LOG_DIR / f"{dom.name()}.log"


def hmp(dom: libvirt.virDomain, command: str) -> str:
    """Run an HMP command; raises :class:`HmpError` when the reply reports an error."""
    reply = libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    text = reply.strip()
    if text.lower().startswith("error") or "Error:" in text:
        raise HmpError(f"HMP {command!r} on {dom.name()!r}: {text}")
    return reply


def _qdev_path(dom: libvirt.virDomain, target: str) -> str:
    aliases = disk_aliases(dom)
    if target not in aliases:
        raise HmpError(f"domain {dom.name()!r} has no live disk {target!r} (aliases: {aliases})")
    return f"/machine/peripheral/{aliases[target]}/virtio-backend"


def qemu_io(dom: libvirt.virDomain, target: str, io_cmd: str, expect: str | None = None,
            timeout: float = 15) -> str:
    """Run ``qemu-io -d <disk> "<io_cmd>"`` on the monitor and return the domain-log
    lines it produced.  With ``expect``, wait (bounded) until a line containing it
    appears and raise :class:`HmpError` if it does not."""
    if '"' in io_cmd:
        raise ValueError("qemu-io command must not contain double quotes")
    log = domain_log(dom)
    start = log.stat().st_size if log.exists() else 0
    hmp(dom, f'qemu-io -d {_qdev_path(dom, target)} "{io_cmd}"')
    deadline = time.monotonic() + timeout
    new = ""
    while True:
        try:
            with open(log, "rb") as f:
                f.seek(start)
                new = f.read().decode(errors="replace")
        except OSError:
            new = ""
        if expect is None or expect in new or any(f"{op} failed" in new for op in ("write", "read", "flush")):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if expect is not None and expect not in new:
        raise HmpError(f"qemu-io {io_cmd!r} on {dom.name()}/{target}: expected {expect!r} in the domain log "
                       f"{log}, got: {new[-1000:]!r}")
    return new


def hmp_write(dom: libvirt.virDomain, target: str, pattern: int, offset: int, length: int,
              flush: bool = True) -> None:
    """Guest write of byte ``pattern`` to [offset, offset+length) of disk ``target``
    through the active layer of the running VM.

    Confirms the write in the domain log.  With ``flush`` (default) a ``flush``
    follows so that qcow2 metadata is on disk and ``qemu-io -U`` readers on the
    host see the data while the VM keeps running.
    """
    qemu_io(dom, target, f"write -P {pattern:#04x} {offset} {length}",
            expect=f"wrote {length}/{length} bytes at offset {offset}")
    if flush:
        qemu_io(dom, target, "flush")


def hmp_read_check(dom: libvirt.virDomain, target: str, pattern: int, offset: int, length: int) -> bool:
    """True when the running VM reads byte ``pattern`` in [offset, offset+length) of ``target``."""
    out = qemu_io(dom, target, f"read -P {pattern:#04x} {offset} {length}",
                  expect=f"read {length}/{length} bytes at offset {offset}")
    return "Pattern verification failed" not in out


__all__ = ["HmpError", "hmp", "qemu_io", "hmp_write", "hmp_read_check", "domain_log"]
