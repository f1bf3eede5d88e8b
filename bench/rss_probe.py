"""A kvm-borg plugin (config `plugins: [bench.rss_probe]`) that records kvm-borg's own peak resident set.

With KVM_BORG_BENCH_RSS_FILE set, when the backup run finished (`kvm_borg_backup_finished`, after the
last repository stored and the view and job ended) it writes the process's own `ru_maxrss` (KiB,
RUSAGE_SELF: this process only, never borg's or restic's, which the parent's `wait4` would include)
to that file. It imports only the standard library.
"""

from __future__ import annotations

import os
import resource

from kvm_borg.hookspecs import hookimpl

RSS_ENV = "KVM_BORG_BENCH_RSS_FILE"


@hookimpl
def kvm_borg_backup_finished():
    path = os.environ.get(RSS_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\n")
