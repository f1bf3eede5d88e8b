"""`python -m bench fleet` (many small domains with `--all` against the plain sequence) still runs end to end:
two tiny domains, one round.

Not a timed test: it asserts that both variants ran and were measured and that nothing is left behind, never what
the figures are.
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


@pytest.mark.timeout(180)
def test_bench_fleet_measures_both_variants_for_every_domain_and_cleans_up(libvirt_conn, run_id, run_dir, tmp_path):
    prefix = f"kbtest-{run_id}-fleet"  # the harness sweeps what a crashed run leaves
    out = tmp_path / "fleet.md"
    argv = [sys.executable, "-m", "bench", "fleet", "--domains", "2", "--rounds", "1", "--disk-mib", "1",
            "--name", prefix, "--workdir", str(run_dir / "bench-fleet"), "--output", str(out)]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=with_production_path({**os.environ, "PYTHONUNBUFFERED": "1"}), timeout=170)
    output = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, output

    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures["domains"] == 2 and len(figures["rounds"]) == 1
    for variant in ("plain", "kvm-borg"):
        measured = figures["rounds"][0][variant]
        assert measured["seconds"] > 0 and measured["cpu"] > 0, (variant, measured)
    report = out.read_text()
    assert report.startswith("# Many small domains") and "per-domain fixed cost beyond the plain sequence" in report
    [row] = [line for line in report.splitlines() if line.startswith("| 1 |")]
    assert len(row.split("|")) == 10  # round, 7 figures, the two borders

    left = [d.name() for d in libvirt_conn.listAllDomains() if d.name().startswith(prefix)]
    assert not left, f"left behind: {left}\n{output}"
    assert not (run_dir / "bench-fleet").exists(), output
