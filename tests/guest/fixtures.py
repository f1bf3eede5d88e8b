"""The guest fixtures, importable by test modules outside tests/guest/.

tests/guest/conftest.py re-exports them; a test module elsewhere does
``from guest.fixtures import guest_artifacts, guest_factory  # noqa: F401``.

guest_artifacts (session) GuestArtifacts: kernel + initramfs, built/cached in
                /var/cache/kvm-borg-tests/guest (first build ~10-30 s); the kernel is
                the PVH-bootable ELF of the same vmlinuz (guest/pvh.py: ~10 s less
                per TCG boot under load).
guest_factory   (function) ``make(fmt="raw", size_mib=64, **xml_kwargs) -> Guest``:
                data disk in image_dir, domain ``kbtest-<run_id>-guest-<n>``
                defined and started (TCG); destroyed and undefined after the test.
                xml_kwargs go to build.guest_domain_xml (interval_ms, agent=False, ...).
"""

from __future__ import annotations

import os

import libvirt
import pytest

from guest import build
from guest.pvh import pvh_artifacts

LIBVIRT_URI = os.environ.get("KVM_BORG_TEST_URI", "qemu:///system")  # as tests/conftest.py


@pytest.fixture(scope="session")
def guest_artifacts() -> build.GuestArtifacts:
    return pvh_artifacts(build.build_guest_artifacts())


def _alive(conn) -> bool:
    """True when an RPC gets through (isAlive() alone does not notice a restarted libvirtd)."""
    try:
        conn.getLibVersion()
        return True
    except libvirt.libvirtError:
        return False


@pytest.fixture
def guest_factory(libvirt_conn, run_id, image_dir, guest_artifacts):
    # Domain names carry the harness run id: its stale-domain sweep (run by every
    # pytest session on this machine) removes any "kbtest-" domain whose run id
    # does not belong to a live pytest process.
    names: list[str] = []
    # The session connection dies when libvirtd restarts (tests/faults restarts it): then
    # this test gets a connection of its own.
    conn = libvirt_conn if _alive(libvirt_conn) else libvirt.open(LIBVIRT_URI)

    def make(fmt: str = "raw", size_mib: int = 64, **xml_kwargs) -> build.Guest:
        name = f"kbtest-{run_id}-guest-{len(names) + 1}"
        names.append(name)
        return build.start_guest(conn, name, guest_artifacts, image_dir, fmt, size_mib, **xml_kwargs)

    yield make
    if not _alive(conn):
        conn = libvirt.open(LIBVIRT_URI)
    for name in reversed(names):
        build.remove_guest(conn, name)
    if conn is not libvirt_conn:
        conn.close()
