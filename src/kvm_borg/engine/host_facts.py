"""What this host says about a domain it is asked to define: emulator, firmware files, its own definition.

The only libvirt calls behind kvm_borg.xml_sanitize.HostFacts: libvirt's domain capabilities for
the archived domain's architecture and virtualization type (`<path>`: the emulator;
`<os><loader><value>`: the firmware files), and the local inactive definition of the domain
with the same UUID, if there is one (its paths were chosen on this host).
"""

from __future__ import annotations

import logging

import libvirt

from kvm_borg.xml_sanitize import HostFacts, capabilities_query, parse_domain_capabilities, trusted_paths_of

log = logging.getLogger(__name__)


def domain_capabilities(conn: libvirt.virConnect, arch: str | None, virt_type: str | None) -> str | None:
    """Given an architecture and a virt type ("kvm", "qemu"; None: libvirt's default), return libvirt's
    domain capabilities XML, trying the default virt type when that one is not available; None if neither."""
    for candidate in dict.fromkeys((virt_type, None)):
        try:
            return conn.getDomainCapabilities(None, arch, None, candidate, 0)
        except libvirt.libvirtError as exc:
            log.debug("domain capabilities for %s/%s: %s", arch, candidate, exc.get_error_message())
    return None


def local_definition(conn: libvirt.virConnect, uuid: str | None) -> str | None:
    """Given a domain UUID, return the inactive XML of this host's domain with that UUID, or None."""
    if not uuid:
        return None
    try:
        return conn.lookupByUUIDString(uuid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    except libvirt.libvirtError:
        return None


def host_facts(conn: libvirt.virConnect, domain_xml: str, uuid: str | None) -> HostFacts:
    """Given the domain XML about to be defined and the archived domain's UUID, return this host's HostFacts."""
    arch, virt_type = capabilities_query(domain_xml)
    caps = domain_capabilities(conn, arch, virt_type)
    emulator, loaders = parse_domain_capabilities(caps) if caps else (None, frozenset())
    return HostFacts(emulator=emulator, loaders=loaders, trusted_paths=trusted_paths_of(local_definition(conn, uuid)))
