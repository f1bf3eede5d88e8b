"""Peak memory of a command and of the processes it starts, by kind (kvm-borg, its segment view, borg, restic).

    run_measured(argv, env, stdout, stderr, marker) -> Measured

The command itself is sampled like its descendants (its `VmHWM`, under the kind "self"; `wait4`'s
`ru_maxrss` would be the largest of it and its children, i.e. borg's). Its descendants (and any
segment-view process whose command line names `marker`, in case it detached) are sampled every `interval` seconds from /proc: each sample reads
`VmHWM` (the process's peak resident set so far) from /proc/PID/status, so the figure per kind is
the largest peak seen, missing at most what a process adds in its last `interval` before it exits.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("view", "borg", "restic")


def classify(cmdline: list[str]) -> str | None:
    """Given a process's argv, return its kind ("view", "borg", "restic") or None for anything else."""
    if any("kvm_borg.segment_view" in arg for arg in cmdline):
        return "view"
    names = [os.path.basename(arg) for arg in cmdline[:3]]
    if "borg" in names or "borg.archiver" in cmdline[:4]:
        return "borg"
    if "restic" in names:
        return "restic"
    return None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


@dataclass
class Measured:
    returncode: int
    seconds: float
    peaks_kib: dict = field(default_factory=dict)  # kind ("self", "view", "borg", "restic") -> largest VmHWM seen


class _Sampler(threading.Thread):
    def __init__(self, root: int, marker: str, interval: float):
        super().__init__(daemon=True)
        self.root, self.marker, self.interval = root, marker, interval
        self.stop = threading.Event()
        self.peaks: dict[str, int] = {}

    def sample(self) -> None:
        children = _children_map()
        todo, seen = list(children.get(self.root, [])), set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo.extend(children.get(pid, []))
        if self.marker:
            for pids in children.values():
                for pid in pids:
                    if pid not in seen and any(self.marker in a for a in _cmdline(pid)):
                        seen.add(pid)
        own = _hwm_kib(self.root)
        if own:
            self.peaks["self"] = max(self.peaks.get("self", 0), own)
        for pid in seen:
            kind = classify(_cmdline(pid))
            hwm = _hwm_kib(pid) if kind else None
            if hwm:
                self.peaks[kind] = max(self.peaks.get(kind, 0), hwm)

    def run(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def run_measured(argv: list[str], env: dict, stdout, stderr, marker: str = "", interval: float = 0.1) -> Measured:
    """Run argv (stdin /dev/null, output to the given open files) to its end; return its exit code, wall
    seconds and the peak RSS by kind of it and its descendants."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    sampler = _Sampler(proc.pid, marker, interval)
    sampler.start()
    try:
        _pid, status = os.waitpid(proc.pid, 0)
    except BaseException:  # our SIGTERM: pass it on and let the command unwind (it ends its own work)
        proc.terminate()
        proc.wait(timeout=300)
        raise
    finally:
        sampler.stop.set()
        sampler.join()
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return Measured(proc.returncode, seconds, dict(sampler.peaks))
