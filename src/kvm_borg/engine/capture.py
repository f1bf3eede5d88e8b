"""What a backup records about a domain besides its disks: its definitions (persistent and live,
secrets included), whether it is persistent and running, the libvirt and QEMU versions, and the
host state it depends on (NVRAM, TPM, networks, pools; kvm_borg.host_state).

Every libvirt error comes out as an EngineError."""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from kvm_borg.engine import host_state
from kvm_borg.engine.libvirt_errors import translated, translating
from kvm_borg.engine.planning import DomainHandle
from kvm_borg.engine.versions import libvirt_versions


@dataclass(frozen=True)
class DomainCapture:
    """One domain as it is at freeze time."""

    persistent: bool
    persistent_xml: str  # the inactive definition (VIR_DOMAIN_XML_INACTIVE | SECURE)
    live_xml: str | None  # the running definition (SECURE); None for a shut-off domain
    libvirt_version: str  # dotted, e.g. "9.0.0"
    qemu_version: str


def xml_flags(inactive: bool) -> int:
    """Given whether the persistent (inactive) definition is wanted, return the XMLDesc flags (secrets included)."""
    return libvirt.VIR_DOMAIN_XML_SECURE | (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)


@translating
def capture_domain(handle: DomainHandle, running: bool) -> DomainCapture:
    """Given a domain and whether its plan saw it running, return its DomainCapture (live XML only when running)."""
    dom = handle.dom
    libvirt_version, qemu_version = libvirt_versions(handle.connection.conn)
    return DomainCapture(
        persistent=bool(dom.isPersistent()),
        persistent_xml=dom.XMLDesc(xml_flags(inactive=True)),
        live_xml=dom.XMLDesc(xml_flags(inactive=False)) if running else None,
        libvirt_version=libvirt_version,
        qemu_version=qemu_version,
    )


def capture_host_state(handle: DomainHandle, capture: DomainCapture, disk_sources: list[str], directory: str):
    """Given a domain, its DomainCapture, its disks' host paths and the staging directory, return the
    host_state.HostState to stage beside the XML (see host_state.capture)."""
    with translated():
        return host_state.capture(handle.connection.conn, handle.uuid, capture.persistent_xml, capture.live_xml,
                                  disk_sources, directory)


@translating
def is_active(handle: DomainHandle) -> bool:
    """Given a domain, return whether it runs now."""
    return bool(handle.dom.isActive())
