"""The parent's side of a segment view: start it, wait until it is mounted, stop it, clean up after a crash.

`start_view` writes the spec (atomic, 0600) and starts `python -m kvm_borg.segment_view SPEC` in a
session of its own, its output in `view.log` beside the spec; it returns once the view reports
`ready` (the mount is live) or raises KvmBorgError with the view's one-line reason.
`outlive_parent=False` (backup) gives it a parent-death signal (SIGTERM: it unmounts and exits if
kvm-borg dies); `True` (`freeze --expose`) lets it stay until `thaw`/`recover`. A parent-death signal
fires when the *thread* that started the child ends: start a backup's view from the thread that
also stops it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvm_borg import atomic, mountinfo
from kvm_borg.errors import KvmBorgError
from kvm_borg.execute import one_line, with_child_priority, with_parent_death_signal
from kvm_borg.segment_view import spec as view_spec
from kvm_borg.segment_view.spec import stats_path, status_path
from kvm_borg.tools import run_tool

logger = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # checking a files view stats every segment file (a borg mount: slow)
STOP_TIMEOUT = 60.0
MODULE = "kvm_borg.segment_view"
FS_TYPE = f"fuse.{view_spec.FS_SUBTYPE}"


@dataclass
class ViewStats:
    """What a view served: bytes actually read from its source per disk target, and whether it
    stopped cleanly (False: killed, the counts are unknown and empty)."""

    bytes_read: dict[str, int] = field(default_factory=dict)
    clean: bool = False


def view_argv(spec_path: Path, *, outlive_parent: bool) -> tuple[str, ...]:
    """Given the spec's path and whether the view outlives kvm-borg, return its argv (this interpreter), at the
    children's priority (config `nice:`/`ionice:`)."""
    argv = (sys.executable, "-m", MODULE, str(spec_path))
    return with_child_priority(argv if outlive_parent else with_parent_death_signal(argv))


def read_stats(spec_path: Path) -> ViewStats:
    """Given the spec's path, return the stats the view wrote on exit (ViewStats() when there are none)."""
    try:
        data = json.loads(stats_path(spec_path).read_bytes())
        return ViewStats({t: int(v["bytes_read"]) for t, v in data["disks"].items()}, bool(data["clean"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ViewStats()


class ViewProcess:
    """A running view: its process, mount point and spec."""

    def __init__(self, process: subprocess.Popen, mountpoint: str, spec_path: Path):
        self.process = process
        self.pid = process.pid
        self.mountpoint = mountpoint
        self.spec_path = spec_path

    def bytes_served(self) -> int:
        """Return the bytes the view has read from its sources so far, all disks together (as of its last
        progress write, at most __main__.PROGRESS_SECONDS old; 0 before the first): cheap enough for
        every progress tick."""
        return sum(read_stats(self.spec_path).bytes_read.values())

    def stop(self, timeout: float = STOP_TIMEOUT) -> ViewStats:
        """Unmount and end the view (SIGTERM; SIGKILL and a lazy unmount if it does not exit within
        `timeout`), wait for it, and return its ViewStats."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("segment view %d did not stop within %gs: killing it", self.pid, timeout)
                self.process.kill()
                self.process.wait()
        lazy_unmount(self.mountpoint)
        return read_stats(self.spec_path)


def _reason(spec_path: Path) -> str | None:
    try:
        text = status_path(spec_path).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    return text


def _log_tail(log_path: Path) -> str | None:
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return one_line(lines[-1]) if lines else None


def start_view(spec: view_spec.ViewSpec, spec_path: str | os.PathLike, *, outlive_parent: bool = False,
               timeout: float = START_TIMEOUT) -> ViewProcess:
    """Given a ViewSpec and where to write it (a directory of its own: status, stats.json and view.log go
    beside it), start the view and return its ViewProcess once the mount is live; KvmBorgError naming
    the reason when it cannot start (the child is then gone and nothing is mounted)."""
    spec_path = Path(spec_path).absolute()
    for stale in (status_path(spec_path), stats_path(spec_path)):
        stale.unlink(missing_ok=True)
    atomic.write_atomic(spec_path, json.dumps(view_spec.to_json(spec)).encode(), 0o600)
    log_path = spec_path.with_name("view.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(view_argv(spec_path, outlive_parent=outlive_parent), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=log, start_new_session=True, close_fds=True)
    view = ViewProcess(process, spec.mountpoint, spec_path)
    deadline = time.monotonic() + timeout
    while True:
        status = _reason(spec_path)
        if status is not None and status.startswith("ready"):
            return view
        if status is not None or process.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if process.poll() is None:
        view.stop(timeout=10)
    else:
        lazy_unmount(spec.mountpoint)
    status = _reason(spec_path)
    if status and status.startswith("error: "):
        reason = status.removeprefix("error: ")
    elif process.returncode is not None and process.returncode != 0 and status is None:
        reason = _log_tail(log_path) or f"exited with status {process.returncode}"
    else:
        reason = f"not mounted within {timeout:g}s"
    raise KvmBorgError(f"segment view at {spec.mountpoint}: {one_line(reason)}")


def lazy_unmount(mountpoint: str) -> None:
    """Given a mount point, detach a view still mounted there (`fusermount3 -u -z`); anything else
    mounted there is left alone."""
    entry = mountinfo.entry_at(os.path.realpath(mountpoint))
    if entry is None or entry.fs_type != FS_TYPE:
        return
    proc = run_tool(("fusermount3", "-u", "-z", mountpoint), ok_codes=None)
    if proc.returncode != 0 and mountinfo.entry_at(os.path.realpath(mountpoint)) is not None:
        raise KvmBorgError(f"cannot unmount the segment view at {mountpoint}: {proc.stderr.strip() or proc.returncode}")


def is_view_process(pid: int) -> bool:
    """Given a pid, return whether it is a running segment view (its command line runs our module)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return MODULE.encode() in argv


def stop_leftover(mountpoint: str, pid: int | None) -> None:
    """Given the mount point and pid a journal recorded, end what is left of that view (recover): SIGTERM
    the pid if it is still a segment view (SIGKILL if it lingers), then detach the mount if it is still
    ours. Safe to call when both are long gone."""
    if pid and is_view_process(pid):
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and is_view_process(pid):
                time.sleep(0.05)
            if not is_view_process(pid):
                break
    lazy_unmount(mountpoint)
