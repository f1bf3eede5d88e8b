"""The incremental benchmark's pure parts: what it writes, how it classifies processes, how it marks targets."""

from __future__ import annotations

from bench.incremental import change_extents, merge_results, size_text
from bench.incremental_report import render, sweep_rows, targets
from bench.procmem import classify

MiB = 1 << 20


def test_change_extents_rewrite_the_percent_in_aligned_units_and_at_least_one():
    extents, unit = change_extents("extents-4m", 16 << 30, 1.0, seed=1)
    assert unit == 4 * MiB and sum(length for _o, length in extents) == 41 * 4 * MiB
    assert all(offset % unit == 0 and length % unit == 0 for offset, length in extents)
    extents, unit = change_extents("blocks-64k", 16 << 30, 1.0, seed=1)
    assert unit == 64 << 10 and sum(length for _o, length in extents) == 2621 * unit
    tiny, unit = change_extents("extents-4m", 64 * MiB, 1.0, seed=1)
    assert sum(length for _o, length in tiny) == unit  # 1 % of 16 units rounds to 0: one is written
    assert change_extents("blocks-64k", 16 << 30, 1.0, seed=2) != change_extents("blocks-64k", 16 << 30, 1.0, seed=1)


def test_size_text_gives_kvm_borg_sizes():
    assert (size_text(4), size_text(0.25), size_text(0.0625), size_text(16)) == ("4MiB", "256KiB", "64KiB", "16MiB")


def test_classify_names_the_view_borg_and_restic_and_nothing_else():
    assert classify(["/venv/bin/python3", "-m", "kvm_borg.segment_view", "/s/spec.json"]) == "view"
    assert classify(["/venv/bin/python3", "/venv/bin/borg", "create", "x"]) == "borg"
    assert classify(["/usr/bin/restic", "backup", "-q"]) == "restic"
    assert classify(["/venv/bin/python3", "/venv/bin/kvm-borg", "backup"]) is None
    assert classify(["qemu-img", "convert"]) is None


def _row(method, backend, case, seconds, rnd=0, **extra):
    return {"variant": f"{backend}-{method}", "method": method, "backend": backend, "case": case, "round": rnd,
            "seconds": seconds, "rss_kib": 40 * 1024, "peaks_kib": {backend: 90 * 1024, "view": 30 * 1024},
            "growth": MiB, "bytes_read": 10 * MiB, "written": MiB, "disks": [], **extra}


def _results():
    series = []
    for rnd in (0, 1, 2):
        series += [_row("snapshot", "borg", "full", 100 + rnd, rnd), _row("bitmap", "borg", "full", 110 + rnd, rnd),
                   _row("snapshot", "borg", "unchanged", 40, rnd), _row("bitmap", "borg", "unchanged", 6, rnd),
                   _row("snapshot", "borg", "extents-4m", 45, rnd), _row("bitmap", "borg", "extents-4m", 9, rnd),
                   _row("snapshot", "borg", "blocks-64k", 50, rnd), _row("bitmap", "borg", "blocks-64k", 49, rnd)]
    sweep = [dict(_row("bitmap", "borg", "full", 120), segment_mib=1.0),
             dict(_row("bitmap", "borg", "blocks-64k", 70), segment_mib=1.0)]
    guest = [{"method": "bitmap", "run": n, "seconds": 2.0, "stall_ms": 80.0 + n, "records_per_s": 90.0,
              "idle_stall_ms": 30.0, "idle_records_per_s": 100.0} for n in (0, 1, 2)]
    return {"backends": ["borg"], "segment_mib": 4.0, "change_percent": 1.0, "series": series, "sweep": sweep,
            "guest": guest, "errors": {}, "dataset": {"disk": 16 << 30, "data": 4 << 30, "real": 3 << 30,
                                                      "image": 4 << 30}}


def test_targets_are_marked_from_ratios_of_medians():
    verdicts = {t["name"]: t["met"] for t in targets(_results())}
    assert verdicts["borg: first full backup"] is True  # 111 / 101 <= 1.2
    assert verdicts["borg: unchanged repeat"] is False  # 6 / 101 > 5 %
    assert verdicts["borg: 1 % rewritten, 4 MiB-aligned extents"] is True  # 9 / 101 <= 10 %
    assert verdicts["borg: 1 % rewritten, 64 KiB blocks at random"] is True  # 49 <= 50
    assert verdicts["borg: worst case at segment size 1 MiB"] is False  # 70 > 50
    assert verdicts["borg: worst case at segment size 4 MiB"] is True  # the series' first round: 49
    assert verdicts["guest: longest write stall during a bitmap backup"] is True  # 82 ms (run 0 left out)
    assert verdicts["guest: write throughput during a bitmap backup"] is True  # 0.9x
    assert verdicts["kvm-borg's own peak RSS during a bitmap run"] is True


def test_nothing_measured_is_never_marked_met():
    results = _results()
    results.update(series=[r for r in results["series"] if r["method"] == "snapshot"], sweep=[], guest=[])
    assert all(t["met"] is None for t in targets(results))
    assert "not measured" in render(results) and "**met**" not in render(results)


def test_sweep_rows_take_the_series_first_round_at_its_segment_size():
    rows = sweep_rows(_results(), "blocks-64k")
    assert [(r["segment_mib"], r["seconds"]) for r in rows] == [(1.0, 70), (4.0, 49)]


def test_merged_results_keep_every_run_and_say_they_were_not_paired():
    a, b = _results(), _results()
    a["series"] = [r for r in a["series"] if r["method"] == "snapshot"]
    b["series"] = [r for r in b["series"] if r["method"] == "bitmap"]
    merged = merge_results([a, b])
    assert len(merged["series"]) == len(_results()["series"]) and len(merged["merged_from"]) == 2
    assert "not** paired" in render(merged)


def test_stretches_split_one_backup_at_the_probe_marks():
    from bench.incremental import stretches

    marks = [{"hook": "before_snapshot", "t": 10.5}, {"hook": "after_snapshot", "t": 11.0},
             {"hook": "after_store", "t": 15.0}, {"hook": "after_store", "t": 17.0},
             {"hook": "before_commit", "t": 17.1}, {"hook": "after_commit", "t": 18.0}]
    assert stretches(marks, 10.0, 18.25) == {"start": 0.5, "freeze": 0.5, "store": 6.0, "release": 1.0, "end": 0.25}
    assert stretches(marks[:2], 10.0, 12.0) == {}  # a run that failed before storing has no full split
