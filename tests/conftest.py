"""Shared fixtures: a real libvirtd (qemu:///system) and throwaway test domains.

Fixtures
--------
libvirt_conn   (session) libvirt.virConnect to qemu:///system; the first use sweeps
               stale ``kbtest-`` domains/dirs of crashed earlier runs.  Fails (never
               skips) with a clear message when libvirtd is not reachable.
run_id         (session) 8 hex chars; domains are named ``kbtest-<run_id>-...``.
run_dir        (session) /var/lib/kvm-borg-tests/<run_id> (0755), removed at the end.
image_dir      (function) run_dir/<test name>/ (0755, readable by QEMU), removed at the end.
domain_factory (function) ``make(disks=[DiskSpec(...)], running=True, persistent=True,
               name=None, memory_mib=None, firmware="bios") -> TestDomain``; every
               domain is destroyed/undefined and its files removed after the test.
vtype          (session) "kvm" or "qemu" (see harness.virt_type).
borg_env_dir   (function) an isolated BORG_BASE_DIR + env dict: ``(env, base_dir)``.
borg_repo      (function) an initialised borg repo (repokey-blake2):
               ``BorgRepo(path, env, passphrase)``.
sshd           (function) a private sshd on 127.0.0.1 for remote repositories
               (``harness.sshd.SshServer``), stopped after the test.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    TEST_PASSPHRASE,
    TEST_ROOT,
    DomainFactory,
    borg_env,
    claim_run_dir,
    make_dir,
    new_run_id,
    run_borg,
    sweep_stale,
    virt_type,
)

LIBVIRT_URI = os.environ.get("KVM_BORG_TEST_URI", "qemu:///system")


def pytest_report_header(config):
    return [f"kvm-borg harness: uri={LIBVIRT_URI} virt_type={virt_type()} test_root={TEST_ROOT}"]


@pytest.fixture(scope="session")
def run_id() -> str:
    return new_run_id()


@pytest.fixture(scope="session")
def run_dir(run_id):
    d = claim_run_dir(run_id)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_conn(run_dir):
    try:
        import libvirt
    except ImportError as e:  # pragma: no cover - setup problem
        pytest.fail(f"libvirt-python is not importable ({e}): run 'sudo bash scripts/setup.sh --dev'",
                    pytrace=False)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # keep libvirt from printing to stderr
    from harness.connection import ReconnectingConnection

    try:
        conn = ReconnectingConnection(LIBVIRT_URI)  # the fault tests restart libvirtd
    except libvirt.libvirtError as e:
        pytest.fail(
            f"libvirtd is not reachable at {LIBVIRT_URI}: {e}\n"
            "Start it (no systemd: 'virtlogd -d; libvirtd -d') or use 'sudo bash scripts/test.sh', "
            "which starts it.",
            pytrace=False,
        )
    sweep_stale(conn)
    yield conn
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


@pytest.fixture(scope="session")
def vtype(libvirt_conn) -> str:
    return virt_type(libvirt_conn)


def _test_label(request) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_.")
    return name[:80] or "test"


@pytest.fixture
def image_dir(request, run_dir) -> Path:
    """A QEMU-readable (0755) per-test directory, removed after the test."""
    base = _test_label(request)
    d = run_dir / base
    n = 1
    while d.exists():
        n += 1
        d = run_dir / f"{base}-{n}"
    make_dir(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def domain_factory(request, libvirt_conn, image_dir, run_id):
    factory = DomainFactory(libvirt_conn, image_dir, run_id, label=request.node.name)
    yield factory
    errors = factory.cleanup()
    if errors:
        pytest.fail("test domain cleanup failed:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def borg_env_dir(tmp_path):
    """``(env, base_dir)``: borg env with an isolated BORG_BASE_DIR under tmp_path."""
    base = tmp_path / "borg-base"
    base.mkdir()
    return borg_env(base_dir=base), base


@dataclass
class BorgRepo:
    path: Path
    env: dict
    passphrase: str = TEST_PASSPHRASE


@pytest.fixture
def borg_repo(tmp_path, borg_env_dir) -> BorgRepo:
    env, _base = borg_env_dir
    path = tmp_path / "borg-repo"
    run_borg("init", "--encryption=repokey-blake2", str(path), env=env)
    return BorgRepo(path, env)


@pytest.fixture
def sshd(image_dir):
    """A private sshd on 127.0.0.1 (own host key, own port, user ``kbtest-backup``): see harness/sshd.py."""
    from harness.sshd import start_sshd

    server = start_sshd(image_dir / "sshd")
    yield server
    server.stop()
