"""The benchmark suite (`python -m bench`) still runs end to end: every phase at tiny sizes, once.

Not a timed test: it asserts that each case produced its rows and figures, never what they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import with_production_path

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_bench_suite_runs_every_case_and_writes_its_table_and_plots(libvirt_conn, run_id, run_dir, tmp_path):
    out = tmp_path / "performance"
    name = f"kbtest-{run_id}-bench"  # the harness sweeps what a crashed run leaves
    argv = [sys.executable, "-m", "bench", "--data-mib", "8", "--disk-mib", "64", "--runs", "1",
            "--repeat-rounds", "1", "--levels", "0,1", "--restore-runs", "1", "--commit-write-mib", "0,8", "--commit-runs", "1",
            "--guest-runs", "1", "--guest-modes", "auto", "--guest-idle-s", "0.5", "--fixed-runs", "1", "--fixed-data-mib", "4",
            "--fixed-disk-mib", "32", "--name", name, "--workdir", str(run_dir / "bench"),
            "--out-dir", str(out)]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=with_production_path({**os.environ, "PYTHONUNBUFFERED": "1"}))
    output = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, output

    table = (out / "suite.md").read_text()
    results = json.loads((out / "suite.json").read_text())
    assert results["errors"] == {} and results["nbd_unavailable"] is None, results["errors"]
    # Every variant of every case has its row, with a number in it.
    for label in ("read limit", "plain sequence: snapshot, `borg create`", "`kvm-borg backup` → borg",
                  "plain sequence: snapshot, `restic backup`", "`kvm-borg backup` → restic",
                  "`virtnbdbackup -l copy`", "`virtnbdbackup -l copy -z`"):
        rows = [line for line in table.splitlines() if line.startswith(f"| {label}")]
        assert rows and any(c.strip(" *").replace(".", "", 1).isdigit() for c in rows[0].split("|")), label
    for heading in ("## Targets", "## Full backups", "## Repeat runs", "## Restore", "## Blockcommit time",
                    "## Guest impact", "## Fixed cost", "## Plots"):
        assert heading in table, heading
    assert "borg, chunker `buzhash,19,23,21,4095`" in table  # case 9
    targets = [line for line in table.split("## Targets")[1].split("##")[0].splitlines() if line.startswith("| ")]
    assert len(targets) == 1 + 6 and not any("not measured" in line for line in targets), targets
    assert [s["level"] for s in results["repeat"]["steps"]] == [0.0, 1.0]  # unchanged, then changed blocks
    assert {r["mib"] for r in results["commit"]} == {0, 8}
    assert [r["mode"] for r in results["guest"]["runs"]] == ["auto"]
    assert (out / "guest-impact.md").read_text().startswith("# Guest impact")
    [fixed] = results["fixed_cost"]["kvm-borg"]
    assert set(fixed["stretches"]) == {"head", "plan", "snapshot", "store", "store_to_commit", "commit", "tail",
                                       "fixed", "fixed_with_commit", "cpu_to_snapshot"} and fixed["stretches"]["head"] > 0
    assert 0 < fixed["stretches"]["cpu_to_snapshot"] < fixed["stretches"]["head"] + fixed["stretches"]["plan"] + 1
    fixed_table = (out / "fixed-cost.md").read_text()
    assert fixed_table.startswith("# Fixed cost of a backup") and "| **median** |" in fixed_table
    for png in ("full-backup.png", "repeat-runs.png", "restore-and-commit.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in table

    # Nothing is left behind: no domain, no scratch directory.
    left = [d.name() for d in libvirt_conn.listAllDomains() if d.name().startswith(name)]
    assert not left, f"left behind: {left}\n{output}"
    assert not (run_dir / "bench").exists(), output


@pytest.mark.timeout(600)
def test_bench_incremental_runs_every_phase_for_both_methods(libvirt_conn, run_id, run_dir, tmp_path):
    """`python -m bench incremental` at tiny sizes: every phase, both methods, both backends, once."""
    out = tmp_path / "performance"
    name = f"kbtest-{run_id}-incr"
    argv = [sys.executable, "-m", "bench", "incremental", "--quick", "--data-mib", "8", "--disk-mib", "64",
            "--segment-mib", "0.25", "--sweep-mib", "0.0625,0.25", "--sweep-backends", "borg", "--guest-runs", "1",
            "--guest-disk-mib", "64", "--guest-idle-s", "0.5", "--guest-pvh",
            "--no-drop-caches", "--name", name, "--workdir", str(run_dir / "bench-incr"),
            "--cache-dir", str(run_dir / "bench-cache"), "--out-dir", str(out)]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, output

    results = json.loads((out / "incremental.json").read_text())
    assert results["errors"] == {}, results["errors"]
    cases = {(r["variant"], r["case"]) for r in results["series"]}
    assert cases == {(f"{kind}-{method}", case) for kind in ("borg", "restic") for method in ("snapshot", "bitmap")
                     for case in ("full", "unchanged", "extents-4m", "blocks-64k")}
    for row in results["series"]:
        assert row["reported_method"] == row["method"], row
        assert row["seconds"] > 0 and row["rss_kib"] > 0 and row["peaks_kib"].get(row["backend"], 0) > 0, row
        if row["method"] == "bitmap":
            assert row["peaks_kib"].get("view", 0) > 0 and row["bytes_read"] is not None, row
    # The changes were written and the bitmap method saw them: its changed runs read more than its unchanged one.
    bitmap_borg = {r["case"]: r for r in results["series"] if r["variant"] == "borg-bitmap"}
    assert bitmap_borg["blocks-64k"]["bytes_read"] > bitmap_borg["unchanged"]["bytes_read"]
    # The sweep leaves out the series' segment size (the series' first round is that size's row).
    assert {(r["segment_mib"], r["backend"], r["case"]) for r in results["sweep"]} == {
        (0.0625, "borg", case) for case in ("full", "blocks-64k")}
    assert len(results["view"]["view"]) == 2 and len(results["view"]["nbdcopy"]) == 2
    assert {(r["method"], r["run"]) for r in results["guest"]} == {(m, n) for m in ("snapshot", "bitmap") for n in (0, 1)}

    table = (out / "incremental.md").read_text()
    for heading in ("## Targets", "## Series: borg", "## Series: restic", "## Memory", "## Segment size sweep",
                    "## Segment view read throughput", "## Guest impact"):
        assert heading in table, heading
    targets = [line for line in table.split("## Targets")[1].split("##")[0].splitlines() if line.startswith("| ")]
    assert targets and not any("not measured" in line for line in targets[1:]), targets
    # borg: 2 sizes (the sweep's and the series'), restic: the series' size
    assert sum("worst case at segment size" in line for line in targets) == 3, targets
    assert "## Where the time goes" in table

    left = [d.name() for d in libvirt_conn.listAllDomains() if d.name().startswith(name)]
    assert not left, f"left behind: {left}\n{output}"
    assert not (run_dir / "bench-incr").exists(), output
