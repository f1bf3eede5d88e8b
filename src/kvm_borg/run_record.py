"""Remember results between runs: update the run state (kvm_borg.run_state) and rewrite the
Prometheus textfile from it (kvm_borg.metrics), so domains a run did not touch keep their series.

Used by the backup pipeline's explicit steps and by `kvm-borg prune`, `check` and `status --refresh`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from kvm_borg import journal, metrics, run_state

log = logging.getLogger(__name__)


def kvm_borg_alive(pid: int) -> bool:
    """Given a pid, return True if it is a running kvm-borg process (its command line names kvm-borg / kvm_borg)."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except OSError:
        return False
    return b"kvm-borg" in cmdline or b"kvm_borg" in cmdline


def pending_entries(journal_dir, alive: Callable[[int], bool] = kvm_borg_alive) -> list[dict]:
    """Given the journal dir, return the readable pending entries as [{domain, stage, created, orphaned}]
    (orphaned: the process that wrote it is gone)."""
    entries, _corrupt = journal.scan_entries(journal_dir)
    return [{"domain": e.domain, "stage": e.stage, "created": e.created,
             "orphaned": e.pid != os.getpid() and not alive(e.pid)} for e in entries]


def job_bound(settings) -> float:
    """Given the Settings, return one domain's bound in seconds: store_timeout + commit_timeout."""
    return float(settings.store_timeout) + float(settings.commit_timeout)


def write_metrics(settings, state: dict) -> str | None:
    """Given the Settings and the run state, rewrite the metrics textfile if one is configured (runs in
    progress whose process is gone left out, the pending journal entries added); return the warning
    (logged) when it cannot be written, else None."""
    if not settings.metrics_file:
        return None
    try:
        if "running" in state:  # a copy: the state on disk keeps them until the next start_run drops them
            state = {**state, "running": {pid: run for pid, run in state["running"].items() if kvm_borg_alive(int(pid))}}
        text = metrics.render(state, settings.hostname or "", pending_entries(settings.journal_dir),
                              job_bound(settings))
        metrics.write_textfile(settings.metrics_file, text)
    except OSError as exc:
        warning = f"cannot write metrics_file {settings.metrics_file}: {exc.strerror or exc}"
        log.warning("%s", warning)
        return warning
    return None


def update_state(settings, change: Callable[[dict], dict]) -> list[str]:
    """Given the Settings and a state -> state function, record it in the run state and rewrite the
    metrics; return the warnings (logged) of the metrics file that could not be written. A run state
    that cannot be written raises OSError."""
    state = run_state.update(settings.state_dir, change)
    warning = write_metrics(settings, state)
    return [warning] if warning else []


def start_run(settings, domains: int) -> list[str]:
    """Given the Settings and how many domains a backup run takes, record the run in progress (its
    deadline: domains x job_bound) and rewrite the metrics, so a run that hangs or dies shows; return
    the warnings. Runs recorded by processes that are gone are dropped."""
    def change(state: dict) -> dict:
        run_state.drop_dead_runs(state, kvm_borg_alive)
        return run_state.record_run_start(state, os.getpid(), domains, job_bound(settings))
    return update_state(settings, change)
