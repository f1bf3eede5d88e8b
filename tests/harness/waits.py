"""Bounded waits of tests: poll a condition until it holds, failing early when the process it waits on ends."""

from __future__ import annotations

import subprocess
import time
from typing import Callable


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 120,
             proc: subprocess.Popen | None = None, interval: float = 0.1) -> None:
    """Given a condition, a description ("failpoint storing"), a timeout in seconds and optionally the
    process that should bring it about, return once `predicate()` is true. Raise AssertionError naming
    `what` when the timeout passes, or with the process's exit code and output when it exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited {proc.returncode} before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
