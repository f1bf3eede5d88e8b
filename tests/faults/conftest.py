"""The fault matrix's report: every case adds a row; the table is printed at the end of the run
and, with $KVM_BORG_RELIABILITY_REPORT=FILE, written as markdown (docs/reliability.md)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest

from guest.fixtures import guest_artifacts, guest_factory  # noqa: F401

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
"""
COMMAND = "KVM_BORG_RELIABILITY_REPORT=docs/reliability.md sudo -E bash scripts/test.sh tests/faults"


@pytest.fixture
def report_row():
    """Yield a dict the test fills (fault, recovered, records_lost, repo_check); kept even on failure."""
    row = {"fault": "?", "runs": 1, "recovered": "no", "records_lost": "?", "repo_check": "?"}
    yield row
    ROWS.append(row)


def render_table(rows: list[dict]) -> str:
    lines = ["| fault | runs | recovered | guest records lost | repository check |", "|---|---:|---|---:|---|"]
    for row in sorted(rows, key=lambda r: r["fault"]):
        lines.append(f"| {row['fault']} | {row['runs']} | {row['recovered']} | {row['records_lost']} | "
                     f"{row['repo_check']} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    terminalreporter.write_sep("=", "kvm-borg fault matrix")
    terminalreporter.write_line(render_table(ROWS))
    target = os.environ.get("KVM_BORG_RELIABILITY_REPORT")
    if target:
        Path(target).write_text(
            "# Reliability: the fault matrix\n\n"
            f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} by\n\n"
            f"```\n{COMMAND}\n```\n\n"
            "Each row is a test in `tests/faults/` against real libvirtd + QEMU + borg, with a real Linux\n"
            "guest appending fsync'd, checksummed, sequence-numbered records during the backup. After the\n"
            "fault: `kvm-borg recover` (or the run itself) brings the domain back onto its own images, no\n"
            "overlay file or journal entry remains, the next backup succeeds, the guest's records in its\n"
            "image have no gap and reach at least the last sequence number the guest reported, and\n"
            "`borg check` passes on the repository.\n\n" + ROW_NOTES + "\n" + render_table(ROWS) + "\n"
        )
