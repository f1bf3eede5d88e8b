"""libvirt's version numbers as dotted strings: the binding's, the daemon's and its hypervisor's."""

from __future__ import annotations

import libvirt

from kvm_borg.engine.libvirt_errors import translated


def dotted_version(number: int) -> str:
    """Given a libvirt version number (major * 1,000,000 + minor * 1,000 + release), return "major.minor.release"."""
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def binding_version() -> str:
    """Return the version of libvirt-python's libvirt library, dotted."""
    return dotted_version(libvirt.getVersion())


def libvirt_versions(conn) -> tuple[str, str]:
    """Given a connection, return (libvirtd's version, the hypervisor's (QEMU's) version), dotted."""
    with translated():
        return dotted_version(conn.getLibVersion()), dotted_version(conn.getVersion())
