"""The fault matrix's report (its hooks and fixture are re-exported by conftest.py): every case adds
a row; the table is printed at the end of the run and, with $KVM_BORG_RELIABILITY_REPORT=FILE,
written as markdown (docs/reliability.md).

A row's `result` is the outcome of its test (pass, or FAIL when any of its checks failed, its
setup broke or it was skipped), taken from pytest's own reports, never from the row's cells. A
run that does not take every case (`-k`) keeps the other rows of the existing FILE, marked as
not run by this run."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import pytest

ROWS: list[dict] = []
ROW_NOTES = """\
Rows about signals and merges (issue 11): "SIGTERM of backup while the guest writes" exits 130
after the run merged back by itself. "merge fails on every retry (failpoint merge-attempt)" makes
every merge attempt fail (`commit_retries: 2`): the run exits 2 naming `kvm-borg recover 'NAME'`,
the domain stays on its overlay with its journal entry, and that command completes it. "SIGTERM
during a failing merge" sends the signal while the merge is shielded, then the merge fails: exit
130 (not 2, no further domain started), the recover command printed, recover completes it.
"state_dir and overlays on one full file system" puts both on a 4 MiB tmpfs that the guest fills
while the repository is written: the journal's stage writes fail with ENOSPC, the merge runs all
the same, the guest paused by the full overlay is resumed on its own images, exit 1 with those
warnings. "corrupt journal entry beside a good one": `recover --all` completes the good entry,
names the bad file, exits 2 and leaves the bad file for the admin.

Rows starting "bitmap:" (tests/faults/test_bitmap_faults.py) are the bitmap method's (issue 15). Most
use an OS-less domain whose every write goes through the VM and into a raw reference model: their
"guest records lost" cell says "n/a: archive = reference" because the stronger check applies — the
next run's archive, restored with `kvm-borg restore`, equals the guest view at its instant byte for
byte. The rows with the real guest ("guest shut down during the job", "scratch file system full
during the job") count records as above. Every bitmap row also checks that no backup job, scratch
file, mounted view, view process or stray `kvm-borg.*` checkpoint is left and the guest is not paused.
"""
COMMAND = "KVM_BORG_RELIABILITY_REPORT=docs/reliability.md sudo -E bash scripts/test.sh tests/faults"
COLUMNS = (("fault", "fault"), ("runs", "runs"), ("recovered", "recovered"),
           ("records_lost", "guest records lost"), ("repo_check", "repository check"), ("result", "result"))
NOT_RUN = "not run by this run"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (`item.kvm_borg_reports[when]`) for `report_row`."""
    outcome = yield
    report = outcome.get_result()
    reports = item.__dict__.setdefault("kvm_borg_reports", {})
    reports[report.when] = report
    if report.when == "teardown" and "report_row" in getattr(item, "fixturenames", ()) \
            and not hasattr(item, "kvm_borg_row"):
        # Its setup broke before `report_row` existed: the case still gets its (failed) row.
        ROWS.append({"fault": item.name, "runs": 1, "recovered": "no", "records_lost": "?", "repo_check": "?",
                     "result": row_result(reports)})


def row_result(reports: dict) -> str:
    """Given a test's phase reports so far ({"setup": ..., "call": ...}), return its row's result.

    "pass" only when setup and call both passed; a failed check, a broken setup or a skip is FAIL."""
    setup, call = reports.get("setup"), reports.get("call")
    if setup is None or not setup.passed:
        return "FAIL (setup)" if setup is not None and setup.failed else "FAIL (not run)"
    if call is None:
        return "FAIL (not run)"
    if call.skipped:
        return "FAIL (skipped)"
    return "pass" if call.passed else "FAIL"


@pytest.fixture
def report_row(request):
    """Yield a dict the test fills (fault, recovered, records_lost, repo_check); kept even on failure,
    with `result` set from the test's outcome."""
    row = {"fault": "?", "runs": 1, "recovered": "no", "records_lost": "?", "repo_check": "?"}
    request.node.kvm_borg_row = row
    yield row
    if row["fault"] == "?":  # it failed before naming its fault
        row["fault"] = request.node.name
    row["result"] = row_result(getattr(request.node, "kvm_borg_reports", {}))
    ROWS.append(row)


def render_table(rows: list[dict]) -> str:
    """Given report rows, return the markdown table, one line per row, sorted by fault."""
    lines = ["| " + " | ".join(title for _key, title in COLUMNS) + " |", "|---|---:|---|---:|---|---|"]
    for row in sorted(rows, key=lambda r: r["fault"]):
        lines.append("| " + " | ".join(str(row.get(key, "?")) for key, _title in COLUMNS) + " |")
    return "\n".join(lines)


def previous_rows(text: str) -> list[dict]:
    """Given an earlier report's markdown, return its table rows as dicts (an older table without a
    result column gives rows without `result`)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return []
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    keys = {title: key for key, title in COLUMNS}
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append({keys.get(title, title): cell for title, cell in zip(header, cells)})
    return rows


def merged_rows(current: list[dict], earlier: list[dict], earlier_when: str) -> list[dict]:
    """Given this run's rows and an earlier report's rows, return this run's rows plus the earlier
    ones for faults this run did not take, their result saying so."""
    taken = {row["fault"] for row in current}
    kept = []
    for row in earlier:
        if row.get("fault") in taken:
            continue
        result = row.get("result") or "?"
        if NOT_RUN not in result:  # carried once already: keep the run it really comes from
            result = f"{result} ({NOT_RUN}; from {earlier_when})"
        kept.append({**row, "result": result})
    return current + kept


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    terminalreporter.write_sep("=", "kvm-borg fault matrix")
    terminalreporter.write_line(render_table(ROWS))
    target = os.environ.get("KVM_BORG_RELIABILITY_REPORT")
    if target:
        rows = ROWS
        if Path(target).is_file():
            earlier = Path(target).read_text()
            when = re.search(r"Generated (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", earlier)
            rows = merged_rows(ROWS, previous_rows(earlier), when.group(1) if when else "an earlier run")
        failed = sum(1 for row in rows if str(row.get("result", "")).startswith("FAIL"))
        not_run = sum(1 for row in rows if NOT_RUN in str(row.get("result", "")))
        footer = (f"**{failed} row(s) FAILED.**" if failed else "No row failed.") + (
            f" {not_run} row(s) {NOT_RUN}." if not_run else "")
        Path(target).write_text(
            "# Reliability: the fault matrix\n\n"
            f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} by\n\n"
            f"```\n{COMMAND}\n```\n\n"
            "Each row is a test in `tests/faults/` against real libvirtd + QEMU + borg, with a real Linux\n"
            "guest appending fsync'd, checksummed, sequence-numbered records during the backup. After the\n"
            "fault: `kvm-borg recover` (or the run itself) brings the domain back onto its own images, no\n"
            "overlay file or journal entry remains, the next backup succeeds, the guest's records in its\n"
            "image have no gap and reach at least the last sequence number the guest reported, and\n"
            "`borg check` passes on the repository.\n\n"
            "`result` is the test's outcome: `pass` when every check of the row passed, `FAIL` when one\n"
            "did not (the other cells then show how far it got), its setup broke or it was skipped. A row\n"
            f"marked \"{NOT_RUN}\" comes from an earlier report (the run took only some cases).\n\n"
            + ROW_NOTES + "\n" + render_table(rows) + "\n\n" + footer + "\n"
        )
