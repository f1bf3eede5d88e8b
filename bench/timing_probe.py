"""A kvm-borg plugin (config `plugins: [bench.timing_probe]`) that timestamps the stages of a backup.

With KVM_BORG_BENCH_TIMING_LOG set, each notification below appends one JSON line
{"hook": name, "t": time.time(), "cpu": time.process_time()} to that file (`cpu`: the kvm-borg
process's own CPU seconds so far, every thread, its children not counted): before/after the snapshot, after each repository
stored (right after its `borg create` exited and its statistics were read), before/after the merge
back, and when the run finished. bench/fixed_cost.py puts these beside the process's start and exit
and libvirt's own log of its first call. It imports nothing heavy, so loading it costs kvm-borg ~1 ms.
"""

from __future__ import annotations

import json
import os
import time

from kvm_borg.hookspecs import hookimpl

LOG_ENV = "KVM_BORG_BENCH_TIMING_LOG"


def _mark(hook: str) -> None:
    now, cpu = time.time(), time.process_time()
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"hook": hook, "t": now, "cpu": cpu}) + "\n")


@hookimpl
def kvm_borg_before_snapshot():
    _mark("before_snapshot")


@hookimpl
def kvm_borg_after_snapshot():
    _mark("after_snapshot")


@hookimpl
def kvm_borg_after_store():
    _mark("after_store")


@hookimpl
def kvm_borg_before_commit():
    _mark("before_commit")


@hookimpl
def kvm_borg_after_commit():
    _mark("after_commit")


@hookimpl
def kvm_borg_backup_finished():
    _mark("backup_finished")
