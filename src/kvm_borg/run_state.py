"""The last results kvm-borg remembers between runs: `state_dir/run-state.json` (root only).

Per domain and repository: the last attempt (when, ok or the error, how long, bytes read and
added, freeze and commit seconds) and the last success; per domain: the last attempt as a whole;
per repository: the last check and the last prune; per domain and repository the last verify drill;
the backup runs in progress (pid -> start and deadline). `kvm-borg status` and the Prometheus
textfile read it, so neither has to open a repository (whose lock a running backup may hold).

The `record_*` functions are pure (state dict in, state dict out); `update` reads, changes and
writes the file under an exclusive lock, atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from kvm_borg.atomic import write_atomic
from kvm_borg.models import CheckResult, PruneResult, RunSummary

log = logging.getLogger(__name__)

STATE_NAME = "run-state.json"
STATE_VERSION = 1


def empty_state() -> dict:
    return {"version": STATE_VERSION, "domains": {}, "repositories": {}}


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_NAME


def load(state_dir: Path) -> dict:
    """Given the state dir, return the recorded state (an empty one if there is none or it is unreadable)."""
    path = state_path(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return empty_state()
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return empty_state()
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return empty_state()
    data.setdefault("domains", {})
    data.setdefault("repositories", {})
    return data


def _write(state_dir: Path, state: dict) -> None:
    text = json.dumps(state, indent=1, ensure_ascii=False, sort_keys=True)
    write_atomic(state_path(state_dir), text.encode("utf-8"), 0o600)


@contextlib.contextmanager
def _locked(state_dir: Path):
    lock_dir = Path(state_dir) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_dir / "run-state.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update(state_dir: Path, change: Callable[[dict], dict]) -> dict:
    """Given the state dir and a function state -> state, apply it under the lock, write and return the new state."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        state = change(load(state_dir))
        _write(state_dir, state)
    return state


# --- pure updates -------------------------------------------------------------------------------


def _domain(state: dict, name: str) -> dict:
    return state["domains"].setdefault(name, {"repositories": {}})


def _repository(state: dict, name: str) -> dict:
    return state["repositories"].setdefault(name, {})


def targeted_repositories(summary: RunSummary, configured: Iterable[str]) -> list[str]:
    """Given a run's summary and the configured repository names, return the repositories the run wrote to.

    Every domain of a run targets the same repositories; when no domain got as far as storing,
    all configured ones are taken."""
    for domain in summary.domains:
        if domain.stores:
            return [store.repository for store in domain.stores]
    return list(configured)


def record_run_start(state: dict, pid: int, domains: int, bound_per_domain: float, now: float | None = None) -> dict:
    """Given the state, the run's pid, how many domains it backs up and one domain's bound in seconds,
    return the state with the run in progress: its start and its deadline (start + domains x bound)."""
    now = time.time() if now is None else now
    state.setdefault("running", {})[str(pid)] = {"started": now, "deadline": now + max(1, domains) * bound_per_domain}
    return state


def drop_dead_runs(state: dict, alive: Callable[[int], bool]) -> dict:
    """Given the state and a pid -> running? test, return the state without the runs whose process is gone."""
    running = state.get("running") or {}
    for pid in [pid for pid in running if not alive(int(pid))]:
        del running[pid]
    return state


def record_backup(state: dict, summary: RunSummary, configured: Iterable[str], now: float | None = None,
                  pid: int | None = None) -> dict:
    """Given the state, a backup run's RunSummary, the configured repository names and the run's pid (its
    entry in progress is ended), return the state with its results."""
    now = time.time() if now is None else now
    repositories = targeted_repositories(summary, configured)
    state["last_run"] = {"time": now, "exit_code": summary.exit_code}
    (state.get("running") or {}).pop(str(os.getpid() if pid is None else pid), None)
    for result in summary.domains:
        entry = _domain(state, result.domain)
        entry["last_attempt"] = {
            "time": now, "ok": result.ok, "error": result.error, "consistency": result.consistency,
            "seconds": result.seconds, "freeze_seconds": result.freeze_seconds,
            "commit_seconds": result.commit_seconds, "warnings": len(result.warnings),
        }
        stores = {store.repository: store for store in result.stores}
        for repository in repositories:
            store = stores.get(repository)
            per_repo = entry["repositories"].setdefault(repository, {})
            ok = bool(store and store.ok)
            attempt = {
                "time": now,
                "ok": ok,
                "error": None if ok else (store.error if store and store.error else result.error),
                "archive": store.archive if store else None,
                "original_size": store.original_size if store else 0,
                "deduplicated_size": store.deduplicated_size if store else 0,
                "store_seconds": store.seconds if store else 0.0,
                "seconds": result.seconds,
                "freeze_seconds": result.freeze_seconds,
                "commit_seconds": result.commit_seconds,
            }
            per_repo["last_attempt"] = attempt
            if attempt["ok"]:
                per_repo["last_success"] = dict(attempt)
                if per_repo.get("archive_count") is not None:
                    per_repo["archive_count"] += 1
    return state


def record_prune(state: dict, repository: str, results: list[PruneResult], archive_counts: dict[str, int],
                 now: float | None = None) -> dict:
    """Given the state, one repository's PruneResults of a prune run and {domain: archives left}, return the updated state."""
    now = time.time() if now is None else now
    failed = [r for r in results if not r.ok]
    _repository(state, repository)["last_prune"] = {
        "time": now, "ok": not failed, "error": failed[0].error if failed else None,
        "pruned": sum(len(r.pruned) for r in results if not r.dry_run),
    }
    for domain, count in archive_counts.items():
        _domain(state, domain)["repositories"].setdefault(repository, {})["archive_count"] = count
    return state


def record_check(state: dict, result: CheckResult, now: float | None = None) -> dict:
    """Given the state and a repository's CheckResult, return the updated state."""
    now = time.time() if now is None else now
    _repository(state, result.repository)["last_check"] = {
        "time": now, "ok": result.ok, "mode": result.mode, "seconds": result.seconds, "error": result.error,
    }
    return state


def record_verify(state: dict, domain: str, repository: str, ok: bool, error: str | None = None,
                  archive: str | None = None, restore_seconds: float | None = None, rto_seconds: float | None = None,
                  now: float | None = None) -> dict:
    """Given the state and one verify drill's outcome (domain, repository, ok, error, archive, seconds),
    return the state with it as the pair's last verify."""
    now = time.time() if now is None else now
    _domain(state, domain)["repositories"].setdefault(repository, {})["last_verify"] = {
        "time": now, "ok": ok, "error": error, "archive": archive,
        "restore_seconds": restore_seconds, "rto_seconds": rto_seconds,
    }
    return state


def record_archives(state: dict, repository: str, domain: str, archives: list, now: float | None = None) -> dict:
    """Given the state and one domain's ArchiveInfos in a repository (oldest first), return the state with
    the repository's truth: the archive count and, if newer than recorded, the last success."""
    per_repo = _domain(state, domain)["repositories"].setdefault(repository, {})
    per_repo["archive_count"] = len(archives)
    if archives:
        from datetime import datetime

        newest = archives[-1]
        try:
            when = datetime.fromisoformat(newest.time).timestamp()
        except ValueError:
            return state
        known = (per_repo.get("last_success") or {}).get("time") or 0
        if when > known + 1:
            per_repo["last_success"] = {
                "time": when, "ok": True, "error": None, "archive": newest.name,
                "original_size": newest.original_size or 0, "deduplicated_size": newest.deduplicated_size or 0,
            }
    return state
