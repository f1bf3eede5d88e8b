"""Named failpoints: places in a run where the fault tests stop or kill kvm-borg on purpose.

Inactive unless $KVM_BORG_FAILPOINT is set (a comma-separated list of `POINT:ACTION`), so the
production path only pays one dictionary look-up. Actions:
- `kill`: SIGKILL this process right there (a crash, a power cut of the tool);
- `pause=FILE`: write our PID into FILE and wait until FILE is deleted (a test acts meanwhile);
- `error`: raise a KvmBorgError (a failure at exactly that point);
- `bug`: raise a RuntimeError (an unexpected exception type, as a bug in kvm-borg or a plugin).

Points, in the order a live backup reaches them: `journal-written` (entry on disk, no snapshot
yet), `snapshot-taken`, `storing` (just before the repositories are written), `release`
(the merge is about to start, signals are shielded), `merge-attempt` (each attempt of the merge,
before any libvirt call: `error` there makes every retry fail, as a broken storage path would),
`commit-ready` (a disk's blockcommit is READY, not pivoted), `pivoted` (a disk is back on its
base, overlay not yet deleted nor the pivot journaled). The bitmap method reaches
`journal-written` (entry on disk, no backup job yet), `job-begun` (the job and its new checkpoint
exist, the maps are not read), `storing` and `release` (the view is about to stop and the job end).
"""

from __future__ import annotations

import os
import signal
import time

from kvm_borg.errors import KvmBorgError

ENV = "KVM_BORG_FAILPOINT"


def parse(spec: str) -> dict[str, str]:
    """Given `POINT:ACTION[,POINT:ACTION]`, return {point: action}."""
    result = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, action = item.partition(":")
        result[point] = action or "kill"
    return result


def reached(point: str) -> None:
    """Act if $KVM_BORG_FAILPOINT names `point`; otherwise return at once."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action = parse(spec).get(point)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "error":
        raise KvmBorgError(f"failpoint {point} reached")
    elif action == "bug":
        raise RuntimeError(f"failpoint {point}: simulated bug")
    elif action.startswith("pause="):
        path = action.split("=", 1)[1]
        with open(path, "w") as handle:
            handle.write(str(os.getpid()))
        while os.path.exists(path):
            time.sleep(0.05)
    else:
        raise KvmBorgError(f"{ENV}: unknown action {action!r} for {point}")
