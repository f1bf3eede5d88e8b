"""Fleet-wide metrics: the `host` label on every series, verify drills, runs in progress and pending
journal entries (pure: run state in, textfile text out, parsed by prometheus_client's own parser)."""

from __future__ import annotations

import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from kvm_borg import journal, metrics, run_record, run_state
from kvm_borg.models import CheckResult, DomainResult, RunSummary, StoreResult


def parsed(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def a_state() -> dict:
    summary = RunSummary([DomainResult("web", ok=True, seconds=3.0, stores=[
        StoreResult("main", ok=True, archive="web-1", original_size=10, deduplicated_size=4)])])
    state = run_state.record_backup(run_state.empty_state(), summary, ["main"], now=1000.0, pid=1)
    run_state.record_check(state, CheckResult("main", ok=True), now=1001.0)
    return run_state.record_verify(state, "web", "main", False, "disk vda: failed", "web-1", 2.5, None, now=1002.0)


def test_every_series_carries_the_host_label():
    entries = [{"domain": "db", "stage": "storing", "created": 900.0, "orphaned": True}]
    state = run_state.record_run_start(a_state(), 4242, 2, 100.0, now=950.0)
    found = parsed(metrics.render(state, "kvm01", entries, job_bound=100.0))
    assert found and all(dict(labels).get("host") == "kvm01" for _name, labels in found)
    names = {name for name, _labels in found}
    assert {"kvm_borg_last_success_timestamp_seconds", "kvm_borg_last_check_success", "kvm_borg_last_run_exit_code",
            "kvm_borg_last_verify_success", "kvm_borg_runs_in_progress", "kvm_borg_run_deadline_timestamp_seconds",
            "kvm_borg_journal_entry_orphaned", "kvm_borg_job_bound_seconds"} <= names
    # Without a host name the label is left out (the text stays as before).
    assert all("host" not in dict(labels) for _n, labels in parsed(metrics.render(a_state())))


def test_a_failed_verify_drill_is_a_series():
    found = parsed(metrics.render(a_state(), "h"))
    key = (("domain", "web"), ("host", "h"), ("repository", "main"))
    assert found[("kvm_borg_last_verify_success", key)] == 0
    assert found[("kvm_borg_last_verify_timestamp_seconds", key)] == 1002.0
    assert found[("kvm_borg_last_verify_restore_seconds", key)] == 2.5
    assert ("kvm_borg_last_verify_rto_seconds", key) not in found  # no --boot: no RTO


def test_a_run_in_progress_has_a_deadline_and_its_end_clears_it():
    state = run_state.record_run_start(run_state.empty_state(), 77, 3, 600.0, now=1000.0)
    state = run_state.record_run_start(state, 78, 1, 600.0, now=1500.0)
    found = parsed(metrics.render(state, "h"))
    assert found[("kvm_borg_runs_in_progress", (("host", "h"),))] == 2
    assert found[("kvm_borg_run_deadline_timestamp_seconds", (("host", "h"),))] == 2100.0  # min(1000+1800, 1500+600)
    state = run_state.record_backup(state, RunSummary([]), ["main"], now=1600.0, pid=78)
    state = run_state.record_backup(state, RunSummary([]), ["main"], now=1700.0, pid=77)
    found = parsed(metrics.render(state, "h"))
    assert found[("kvm_borg_runs_in_progress", (("host", "h"),))] == 0
    assert not any(name == "kvm_borg_run_deadline_timestamp_seconds" for name, _l in found)
    assert run_state.drop_dead_runs({"running": {"1": {}, "2": {}}}, lambda pid: pid == 2) == {"running": {"2": {}}}


def test_pending_journal_entries_tell_a_live_run_from_a_dead_one(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    journal.write_entry(tmp_path, journal.Entry(domain="gone", uuid="u1", source="libvirt-snapshot", stage="storing", disks=[],
                                                pid=int(dead.stdout), created=time.time() - 5))
    journal.write_entry(tmp_path, journal.Entry(domain="mine", uuid="u2", source="libvirt-snapshot", stage="storing",
                                                disks=[]))
    entries = {e["domain"]: e for e in run_record.pending_entries(tmp_path)}
    assert entries["gone"]["orphaned"] is True and entries["mine"]["orphaned"] is False  # the writer is this process
    found = parsed(metrics.render(run_state.empty_state(), "h", list(entries.values())))
    assert found[("kvm_borg_journal_entry_orphaned", (("domain", "gone"), ("host", "h"), ("stage", "storing")))] == 1
    assert found[("kvm_borg_journal_entry_created_timestamp_seconds",
                  (("domain", "mine"), ("host", "h"), ("stage", "storing")))] == entries["mine"]["created"]
    assert run_record.kvm_borg_alive(int(dead.stdout)) is False
