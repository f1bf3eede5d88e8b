"""A kvm-borg plugin (config `plugins: [guest.timing_plugin]`) that timestamps the backup's phases.

With KBGUEST_TIMING_FILE set, every notification hook appends one JSON line
{"hook": name, "t": time.monotonic(), ...}.  CLOCK_MONOTONIC is system-wide, so the
benchmark (another process) can compare these times with its own observations of
the guest's serial console.  Phases: snapshot = before_snapshot..after_snapshot,
commit = before_commit..after_commit.
"""

from __future__ import annotations

import json
import os
import time

from kvm_borg.hookspecs import hookimpl


def _record(hook: str, **fields) -> None:
    path = os.environ.get("KBGUEST_TIMING_FILE")
    if path:
        line = json.dumps({"hook": hook, "t": time.monotonic(), **fields}, default=str)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


@hookimpl
def kvm_borg_before_snapshot(domain, disks, quiesce):
    _record("before_snapshot", domain=domain, quiesce=quiesce)


@hookimpl
def kvm_borg_after_snapshot(domain, disks, quiesced, seconds):
    _record("after_snapshot", domain=domain, quiesced=quiesced, seconds=seconds)


@hookimpl
def kvm_borg_before_commit(domain, disks):
    _record("before_commit", domain=domain)


@hookimpl
def kvm_borg_after_commit(domain, disks, seconds):
    _record("after_commit", domain=domain, seconds=seconds)
