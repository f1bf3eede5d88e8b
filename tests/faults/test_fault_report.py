"""The fault matrix's table: its result column comes from the tests' real outcomes (a failed check
is FAIL), and a partial run keeps the rows it did not take, saying so. Runs pytest itself on small
stand-in cases: no guest needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fault_report import merged_rows, previous_rows, render_table

FAULTS_DIR = Path(__file__).resolve().parent

CASES = textwrap.dedent('''
    import pytest

    def test_all_checks_pass(report_row):
        report_row.update(fault="fault A", recovered="yes", records_lost=0, repo_check="ok")

    def test_a_check_fails_after_the_row_looked_fine(report_row):
        report_row.update(fault="fault B", recovered="yes", records_lost=0, repo_check="ok")
        assert 1 + 1 == 3, "the last check of the row"

    def test_skipped(report_row):
        report_row["fault"] = "fault C"
        pytest.skip("a skip is a defect, never a pass")

    @pytest.fixture
    def broken():
        raise RuntimeError("setup broke")

    def test_setup_breaks(broken, report_row):
        report_row["fault"] = "fault D"
''')


def run_cases(tmp_path: Path, report: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(FAULTS_DIR)!r})\n"
        "from fault_report import pytest_runtest_makereport, pytest_terminal_summary, report_row  # noqa\n")
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {**os.environ, "KVM_BORG_RELIABILITY_REPORT": str(report)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), "-c", os.devnull, str(tmp_path / "test_cases.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def table_rows(report: Path) -> dict[str, dict]:
    return {row["fault"]: row for row in previous_rows(report.read_text())}


def test_the_result_column_says_fail_when_a_check_failed(tmp_path):
    report = tmp_path / "reliability.md"
    proc = run_cases(tmp_path, report)
    assert proc.returncode == 1, proc.stdout  # the failing cases fail the run too
    rows = table_rows(report)
    assert rows["fault A"]["result"] == "pass"
    assert rows["fault B"]["result"] == "FAIL" and rows["fault B"]["recovered"] == "yes"
    assert rows["fault C"]["result"] == "FAIL (skipped)"
    assert rows["test_setup_breaks"]["result"] == "FAIL (setup)"  # its setup broke before it named its fault
    assert "**3 row(s) FAILED.**" in report.read_text()


def test_a_partial_run_keeps_the_other_rows_marked_not_run(tmp_path):
    report = tmp_path / "reliability.md"
    run_cases(tmp_path, report)
    proc = run_cases(tmp_path, report, "-k", "all_checks_pass")
    assert proc.returncode == 0, proc.stdout
    rows = table_rows(report)
    assert rows["fault A"]["result"] == "pass"
    assert rows["fault B"]["result"].startswith("FAIL (not run by this run; from ")
    assert rows["fault C"]["result"].startswith("FAIL (skipped) (not run by this run; from ")
    assert "3 row(s) FAILED" in report.read_text() and "3 row(s) not run by this run" in report.read_text()


def test_an_old_table_without_a_result_column_is_carried_as_unknown():
    old = ("| fault | runs | recovered | guest records lost | repository check |\n|---|---:|---|---:|---|\n"
           "| wrong passphrase | 1 | yes | 0 | ok |\n")
    rows = merged_rows([{"fault": "new", "runs": 1, "recovered": "yes", "records_lost": 0, "repo_check": "ok",
                         "result": "pass"}], previous_rows(old), "2026-11-26 14:55 UTC")
    table = render_table(rows)
    assert "| new | 1 | yes | 0 | ok | pass |" in table
    assert "| wrong passphrase | 1 | yes | 0 | ok | ? (not run by this run; from 2026-11-26 14:55 UTC) |" in table
    # Carried again by a later partial run: it still names the run it comes from.
    again = render_table(merged_rows([], previous_rows(table), "2026-12-01 12:00 UTC"))
    assert "| wrong passphrase | 1 | yes | 0 | ok | ? (not run by this run; from 2026-11-26 14:55 UTC) |" in again
