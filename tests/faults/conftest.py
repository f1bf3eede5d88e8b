"""The fault matrix's report (tests/faults/fault_report.py) and the guest fixtures."""

from __future__ import annotations

from fault_report import pytest_runtest_makereport, pytest_terminal_summary, report_row  # noqa: F401
from guest.fixtures import guest_artifacts, guest_factory  # noqa: F401
