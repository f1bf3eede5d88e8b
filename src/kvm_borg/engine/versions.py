"""libvirt's version numbers as dotted strings: the binding's, the daemon's and its hypervisor's."""

from __future__ import annotations

import libvirt

from kvm_borg.engine.libvirt_errors import translated
from kvm_borg.errors import KvmBorgError


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


# libvirt enables incremental backup (checkpoints + pull-mode backup jobs) by default from 7.6.0 on
# (NEWS.rst, v7.6.0); before, a domain needed QEMU's incremental-backup capability added by hand.
BACKUP_MIN_LIBVIRTD = 7_006_000


def backup_api_problem(conn) -> str | None:
    """Given a connection, return why libvirt cannot run the bitmap method's backup jobs (the binding lacks
    virDomainBackupBegin, libvirtd predates 7.6.0, or libvirt did not answer: "libvirt: ..."), or None
    when it can."""
    if not hasattr(libvirt.virDomain, "backupBegin"):
        return f"libvirt-python {binding_version()} has no virDomainBackupBegin"
    try:
        with translated():
            number = conn.getLibVersion()
    except KvmBorgError as exc:
        return f"libvirt: {exc}"
    if number < BACKUP_MIN_LIBVIRTD:
        return f"libvirtd {dotted_version(number)} predates 7.6.0 (incremental backup not enabled)"
    return None
