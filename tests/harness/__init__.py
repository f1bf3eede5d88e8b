"""Test harness for kvm-borg: real libvirtd + QEMU, throwaway domains, image checks.

Fixtures live in tests/conftest.py (libvirt_conn, run_id, run_dir, image_dir,
domain_factory, borg_repo); the helpers are importable from here::

    from harness import DiskSpec, hmp_write, image_has_pattern, qemu_img_compare, tmpfs
"""

from .cli import (
    BORG_BIN,
    KVM_BORG_BIN,
    RESTIC_BIN,
    TEST_PASSPHRASE,
    VENV_BIN,
    borg_env,
    restic_env,
    run_borg,
    run_cli,
    start_borg,
    start_cli,
)
from .domains import (
    DiskSpec,
    DomainFactory,
    TestDomain,
    disk_aliases,
    disk_formats,
    domain_xml,
    inactive_sources,
    live_sources,
    remove_domain,
    virt_type,
    wait_state,
)
from .hmp import HmpError, domain_log, hmp, hmp_read_check, hmp_write, qemu_io
from .images import (
    MiB,
    ImageError,
    backing_chain,
    check_patterns,
    create_image,
    image_has_pattern,
    image_info,
    image_virtual_size,
    mib_byte,
    qemu_img_compare,
    read_guest_bytes,
    verify_fill,
)
from .mounts import tmpfs
from .runs import DOMAIN_PREFIX, TEST_ROOT, claim_run_dir, make_dir, new_run_id, sweep_stale
from .waits import wait_for

__all__ = [name for name in dir() if not name.startswith("_")]
