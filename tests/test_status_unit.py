"""Pure parts of status, the run state and the freeze exposure layout (no libvirt, no repository)."""

from __future__ import annotations

from pathlib import Path

from kvm_borg import run_state
from kvm_borg.pipeline.exposure import exposure_paths
from kvm_borg.pipeline.staging import point_meta_at_exposure
from kvm_borg.actions.status import domain_rows, format_age, verdict
from kvm_borg.models import ArchiveInfo, CheckResult, DomainResult, FrozenDisk, PruneResult, RunSummary, StoreResult


def summary(*results: DomainResult) -> RunSummary:
    return RunSummary(list(results))


def test_a_failure_before_storing_is_recorded_for_the_repositories_the_run_wrote_to():
    ok = DomainResult("a", ok=True, stores=[StoreResult("r1", ok=True, archive="a-1", original_size=5)])
    failed = DomainResult("b", ok=False, error="refused")
    state = run_state.record_backup(run_state.empty_state(), summary(ok, failed), ["r1", "r2"], now=100.0)
    assert set(state["domains"]["b"]["repositories"]) == {"r1"}  # not r2: this run did not write there
    assert state["domains"]["b"]["repositories"]["r1"]["last_attempt"]["error"] == "refused"
    assert "last_success" not in state["domains"]["b"]["repositories"]["r1"]
    alone = run_state.record_backup(run_state.empty_state(), summary(failed), ["r1", "r2"], now=100.0)
    assert set(alone["domains"]["b"]["repositories"]) == {"r1", "r2"}


def test_a_later_failure_keeps_the_last_success():
    good = DomainResult("a", ok=True, stores=[StoreResult("r", ok=True, archive="a-1")])
    bad = DomainResult("a", ok=False, error="x", stores=[StoreResult("r", ok=False, error="borg failed")])
    state = run_state.record_backup(run_state.empty_state(), summary(good), ["r"], now=100.0)
    state = run_state.record_backup(state, summary(bad), ["r"], now=200.0)
    entry = state["domains"]["a"]["repositories"]["r"]
    assert entry["last_success"]["time"] == 100.0 and entry["last_attempt"] == {**entry["last_attempt"], "ok": False,
                                                                                  "error": "borg failed", "time": 200.0}


def test_prune_check_and_refresh_are_recorded():
    state = run_state.empty_state()
    run_state.record_prune(state, "r", [PruneResult("r", "a", ok=True, kept={"a-2": "keep_daily"}, pruned=["a-1"])],
                           {"a": 1}, now=5.0)
    run_state.record_check(state, CheckResult("r", ok=False, error="bad segment"), now=6.0)
    assert state["repositories"]["r"]["last_prune"] == {"time": 5.0, "ok": True, "error": None, "pruned": 1}
    assert state["repositories"]["r"]["last_check"]["ok"] is False
    assert state["domains"]["a"]["repositories"]["r"]["archive_count"] == 1
    run_state.record_archives(state, "r", "a", [ArchiveInfo("a-9", "a", "2026-01-02T00:00:00+00:00", "r",
                                                            original_size=7)])
    assert state["domains"]["a"]["repositories"]["r"]["last_success"]["archive"] == "a-9"


def test_status_rows_and_exit_codes():
    state = run_state.empty_state()
    good = DomainResult("a", ok=True, stores=[StoreResult("r", ok=True, archive="a-1", original_size=9)])
    run_state.record_backup(state, summary(good), ["r"], now=1000.0)
    rows = domain_rows(state, ["a", "never"], ["r"], max_age=3600, now=1600.0)
    assert [(r["domain"], r["stale"], r["age_seconds"], r["last_size"]) for r in rows] == [
        ("a", False, 600.0, 9), ("never", True, None, None)]
    assert verdict(rows) == 2 and verdict(rows[:1]) == 0
    failed = DomainResult("a", ok=False, error="x", stores=[StoreResult("r", ok=False, error="x")])
    run_state.record_backup(state, summary(failed), ["r"], now=1500.0)
    assert verdict(domain_rows(state, ["a"], ["r"], 3600, 1600.0)) == 1
    assert verdict(domain_rows(state, ["a"], ["r"], 60, 1600.0)) == 2
    assert [format_age(s) for s in (None, 59, 3600, 93784)] == ["never", "0m", "1h0m", "1d2h"]


def test_exposure_paths_are_stable_and_meta_points_at_them():
    disk = FrozenDisk("vda", "/img/web.qcow2", "qcow2", 1, "/img/web.qcow2", backing_chain=("/img/base.qcow2",))
    exposed = exposure_paths(Path("/x/web"), [disk])
    assert exposed == {"/img/web.qcow2": "/x/web/disks/vda.qcow2", "/img/base.qcow2": "/x/web/disks/vda.backing1"}
    meta = {"disks": [{"read_from": "/img/web.qcow2", "archive_path": "img/web.qcow2",
                       "backing_chain": [{"path": "/img/base.qcow2", "archive_path": "img/base.qcow2"}]}]}
    point_meta_at_exposure(meta, exposed)
    assert meta["disks"][0]["archive_path"] == "x/web/disks/vda.qcow2"
    assert meta["disks"][0]["backing_chain"][0]["archive_path"] == "x/web/disks/vda.backing1"


def test_fleet_rows_take_each_hosts_newest_archive_per_domain_and_repository():
    from kvm_borg.actions.status import fleet_rows

    archives = [ArchiveInfo("a-1", "a", "2026-01-01T00:00:00+00:00", "shared", original_size=1, host="hv1"),
                ArchiveInfo("a-2", "a", "2026-01-02T00:00:00+00:00", "shared", original_size=2, host="hv1"),
                ArchiveInfo("a-9", "a", "2026-01-01T12:00:00", "shared", host="hv2"),  # naive: UTC
                ArchiveInfo("b-1", "b", "garbage", "shared", host="hv2")]  # unreadable time: not a backup
    day2 = 1767312000.0  # 2026-01-02T00:00:00Z
    rows = fleet_rows(archives, max_age=86400, now=day2 + 60)
    assert [(r["host"], r["domain"], r["archive"], r["archive_count"], r["age_seconds"], r["stale"]) for r in rows] == [
        ("hv1", "a", "a-2", 2, 60.0, False), ("hv2", "a", "a-9", 1, 43260.0, False)]
    assert rows[0]["last_size"] == 2 and verdict(rows) == 0
    assert verdict(fleet_rows(archives, max_age=3600, now=day2 + 60)) == 2
