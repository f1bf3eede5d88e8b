"""Test-run bookkeeping: run ids, the QEMU-readable test root, and the stale sweep.

Every pytest process gets a short random run id.  Its domains are named
``kbtest-<runid>-...`` and its images live under ``TEST_ROOT/<runid>/``, where an
``owner`` file records the pid and start time of the pytest process.  The sweep at
session start removes domains and directories of runs whose owner is gone, and
leaves alone runs of other pytest processes that are still alive (several
engineers may run the suite on one machine at the same time).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

DOMAIN_PREFIX = "kbtest-"
TEST_ROOT = Path(os.environ.get("KVM_BORG_TEST_ROOT", "/var/lib/kvm-borg-tests"))
_RUNID_RE = re.compile(r"^[0-9a-f]{8}$")


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the ")" that ends the command name.
    return stat.rsplit(")", 1)[1].split()[19]


def make_dir(path: Path, mode: int = 0o755) -> Path:
    """mkdir -p with an explicit mode on every created level (umask-proof)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        os.chmod(d, mode)
    os.chmod(path, mode)
    return path


def claim_run_dir(run_id: str) -> Path:
    """Create ``TEST_ROOT/<run_id>`` (0755) owned by this process."""
    make_dir(TEST_ROOT)
    run_dir = make_dir(TEST_ROOT / run_id)
    pid = os.getpid()
    (run_dir / "owner").write_text(f"{pid} {_proc_start_time(pid)}\n")
    return run_dir


def run_is_alive(run_id: str) -> bool:
    """True when the pytest process that owns ``run_id`` still runs."""
    owner = TEST_ROOT / run_id / "owner"
    try:
        pid_s, start = owner.read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _proc_start_time(pid) == start


def run_id_of(domain_name: str) -> str | None:
    if not domain_name.startswith(DOMAIN_PREFIX):
        return None
    rid = domain_name[len(DOMAIN_PREFIX):].split("-", 1)[0]
    return rid if _RUNID_RE.match(rid) else None


def sweep_stale(conn, *, log=print, only_run_ids: set[str] | None = None) -> list[str]:
    """Remove ``kbtest-`` domains and run directories of runs whose owner is gone.

    ``only_run_ids`` limits the sweep to those runs (used by the harness self-test).
    Returns the names of the removed domains.
    """
    from .domains import remove_domain

    removed: list[str] = []
    for dom in conn.listAllDomains(0):
        name = dom.name()
        if not name.startswith(DOMAIN_PREFIX):
            continue
        rid = run_id_of(name)
        if only_run_ids is not None and rid not in only_run_ids:
            continue
        if rid is not None and run_is_alive(rid):
            continue
        log(f"kbtest sweep: removing stale domain {name!r}")
        remove_domain(conn, name)
        removed.append(name)
    if TEST_ROOT.is_dir():
        for d in TEST_ROOT.iterdir():
            if not d.is_dir() or not _RUNID_RE.match(d.name):
                continue
            if only_run_ids is not None and d.name not in only_run_ids:
                continue
            if run_is_alive(d.name):
                continue
            # A run that is just starting has no owner file yet: leave very young dirs.
            if not (d / "owner").exists() and time.time() - d.stat().st_mtime < 60:
                continue
            log(f"kbtest sweep: removing stale directory {d}")
            shutil.rmtree(d, ignore_errors=True)
    return removed
