"""The restore benchmark (`python -m bench restore`) still runs end to end at a tiny size: both repositories,
every full-restore variant, the live restore against the full one, once each.

Not a timed test: it asserts that each variant produced its row, restored the image intact, and that every
target has a verdict, never what the figures are.
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
VARIANTS = ("kvm-borg (borg)", "borg extract --sparse + sync", "kvm-borg (restic)", "restic dump > file + sync",
            "restic restore + sync")


@pytest.mark.timeout(300)
def test_bench_restore_measures_every_variant_and_the_live_restore(libvirt_conn, run_id, run_dir, tmp_path):
    name = f"kbtest-{run_id}-brestore"  # the harness sweeps what a crashed run leaves
    report, figures_path = tmp_path / "restore.md", tmp_path / "restore.json"
    argv = [sys.executable, "-m", "bench", "restore", "--data-mib", "8", "--disk-mib", "32", "--runs", "1",
            "--live-runs", "1", "--no-drop-caches", "--name", name, "--workdir", str(run_dir / "bench-restore"),
            "--cache-dir", str(run_dir / "bench-restore-cache"), "--output", str(report), "--json", str(figures_path)]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=with_production_path({**os.environ, "PYTHONUNBUFFERED": "1"}))
    output = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, output

    figures = json.loads(figures_path.read_text())
    for variant in VARIANTS:
        [run] = figures["full"][variant]
        assert run["identical"] and run["size"] == figures["image"] and run["seconds"] > 0, (variant, run)
    [live], [full] = figures["live"]["live"], figures["live"]["full"]
    assert 0 < live["running"] <= live["seconds"] and full["seconds"] > 0, figures["live"]
    table = report.read_text()
    for variant in VARIANTS:
        assert any(line.startswith(f"| {variant} |") for line in table.splitlines()), variant
    targets = [line for line in table.split("## Targets")[1].splitlines() if line.startswith("| ")]
    assert len(targets) == 1 + 5 and all("**met**" in t or "**MISSED**" in t for t in targets[1:]), targets

    left = [d.name() for d in libvirt_conn.listAllDomains() if d.name().startswith(name)]
    assert not left, f"left behind: {left}\n{output}"
    assert not (run_dir / "bench-restore").exists(), output
