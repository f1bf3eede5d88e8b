"""What a backup costs a running guest: the freeze window and the longest write stall, per phase.

    /work/venv/bin/python -m bench.guest_impact [--runs 5] [--modes auto,off] [--interval-ms 20]

Boots the real test guest of tests/guest (TCG, 1 vCPU: a Debian kernel, qemu-ga, and a workload
that appends one fsync()ed 64-byte record every --interval-ms and prints "KBSEQ <seq> <guest
CLOCK_MONOTONIC us>" on its serial console; qemu-ga's fsfreeze hook prints "KBHOOK freeze|thaw
<us>" before FIFREEZE / after FITHAW). Then runs `kvm-borg backup` N times per quiesce mode
(modes alternate), with an idle pause before each run, and reports:

- freeze window (guest): KBHOOK thaw - KBHOOK freeze, i.e. FIFREEZE..FITHAW plus one run of the
  hook on each side (a static binary: a few ms under TCG);
- snapshot call (host): kvm-borg's `freeze_seconds` (agent freeze + snapshot + thaw inside libvirt);
- longest write stall during the snapshot phase (before_snapshot..after_snapshot hooks) and during
  the commit phase (before_commit..after_commit), and, for reference, in an idle window of the
  same length as the whole backup just before it: the longest gap between two consecutive durable
  records (it includes the workload's own interval and fsync time);
- the whole backup and the commit (host seconds).

Host phase times come from the plugin tests/guest/timing_plugin.py (time.monotonic(), system-wide);
they are mapped onto the guest clock through a console watcher that stamps every KBSEQ line as it
appears in the serial log file: offset = min(host seen - guest stamp) over the run. Not a timed
test: prints a markdown table (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from guest import build  # noqa: E402
from harness import KVM_BORG_BIN  # noqa: E402
from harness.cli import _merged_env  # noqa: E402
from support import cli_env, write_config  # noqa: E402

from bench.common import machine_description, remove_domain  # noqa: E402

DOMAIN = "kvm-borg-bench-guest"  # not "kbtest-": the test harness sweeps those


class ConsoleWatcher(threading.Thread):
    """Tails the serial log; for each KBSEQ line, the host time.monotonic() it was first seen."""

    def __init__(self, console_log: Path, poll: float = 0.002):
        super().__init__(daemon=True)
        self.console_log, self.poll = console_log, poll
        self.stop = threading.Event()
        self.seen: list[tuple[float, int]] = []  # (host seconds, guest us)

    def run(self):
        position, partial = 0, b""
        while not self.stop.is_set():
            try:
                with open(self.console_log, "rb") as handle:
                    handle.seek(position)
                    data = handle.read()
            except FileNotFoundError:
                data = b""
            now = time.monotonic()
            if data:
                position += len(data)
                lines = (partial + data).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    parts = line.strip().split()
                    if len(parts) == 3 and parts[0] == b"KBSEQ":
                        self.seen.append((now, int(parts[2])))
            self.stop.wait(self.poll)

    def offset(self, since: float) -> float:
        """host - guest seconds, estimated from lines seen after `since` (the smallest delay wins)."""
        samples = [host - guest / 1e6 for host, guest in self.seen if host >= since]
        if not samples:
            raise RuntimeError("no KBSEQ line seen on the console")
        return min(samples)


@dataclass
class Run:
    mode: str
    total_s: float
    snapshot_call_s: float
    commit_s: float
    freeze_window_ms: float | None
    stall_snapshot_ms: float
    stall_commit_ms: float
    stall_idle_ms: float
    gap_idle_median_ms: float
    start_to_snapshot_s: float
    store_s: float
    consistency: str
    extra: dict = field(default_factory=dict)


def _stall_ms(seq_times, start_us, end_us) -> float:
    stall = build.longest_stall(seq_times, int(start_us), int(end_us))
    return stall.gap_us / 1000 if stall else float("nan")


def _median_gap_ms(seq_times, start_us, end_us) -> float:
    gaps = [t2 - t1 for (s1, t1), (s2, t2) in zip(seq_times, seq_times[1:])
            if s2 > s1 and start_us <= t1 and t2 <= end_us]
    return statistics.median(gaps) / 1000 if gaps else float("nan")


def one_backup(config: Path, guest: build.Guest, watcher: ConsoleWatcher, mode: str, timing: Path,
               idle_s: float) -> Run:
    timing.unlink(missing_ok=True)
    hooks_before = len(build.serial_hooks(guest.console_log))
    idle_start = time.monotonic()
    time.sleep(idle_s)
    started = time.monotonic()
    proc = subprocess.run([str(KVM_BORG_BIN), "--config", str(config), "-q", "backup", guest.name, "--json"],
                          env=_merged_env(cli_env(KBGUEST_TIMING_FILE=timing)), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    total = time.monotonic() - started
    if not proc.stdout:
        raise RuntimeError(f"kvm-borg backup exited {proc.returncode}: {proc.stderr}")
    [result] = json.loads(proc.stdout)["domains"]
    if not result["ok"]:
        raise RuntimeError(f"backup failed: {result['error']}\n{proc.stderr}")
    time.sleep(0.5)  # let the console catch up past the commit
    marks = {e["hook"]: e["t"] for e in map(json.loads, timing.read_text().splitlines())}
    offset = watcher.offset(idle_start)

    def guest_us(host_t: float) -> float:
        return (host_t - offset) * 1e6

    seq_times = build.serial_seq_times(guest.console_log)
    hooks = build.serial_hooks(guest.console_log)[hooks_before:]
    window = None
    if [a for a, _ in hooks] == ["freeze", "thaw"]:
        window = (hooks[1][1] - hooks[0][1]) / 1000
    elif hooks:
        raise RuntimeError(f"unexpected fsfreeze hook runs: {hooks}")
    errors = build.serial_errors(guest.console_log)
    if errors:
        raise RuntimeError(f"guest I/O errors: {errors}")
    return Run(
        mode=mode,
        total_s=total,
        snapshot_call_s=result["freeze_seconds"],
        commit_s=result["commit_seconds"],
        freeze_window_ms=window,
        stall_snapshot_ms=_stall_ms(seq_times, guest_us(marks["before_snapshot"]), guest_us(marks["after_snapshot"])),
        stall_commit_ms=_stall_ms(seq_times, guest_us(marks["before_commit"]), guest_us(marks["after_commit"])),
        stall_idle_ms=_stall_ms(seq_times, guest_us(idle_start), guest_us(idle_start + idle_s)),
        start_to_snapshot_s=marks["before_snapshot"] - started,
        store_s=marks["before_commit"] - marks["after_snapshot"],
        gap_idle_median_ms=_median_gap_ms(seq_times, guest_us(idle_start), guest_us(idle_start + idle_s)),
        consistency=result["consistency"],
    )


def _fmt(values: list[float | None], unit: str) -> tuple[str, str]:
    """(median, max) as text; unit "ms" (values in ms), "s>ms" (seconds shown as ms) or "s"."""
    present = [v for v in values if v is not None and v == v]
    if not present:
        return "-", "-"
    if unit == "s":
        return f"{statistics.median(present):.2f} s", f"{max(present):.2f} s"
    scale = 1000 if unit == "s>ms" else 1
    return f"{statistics.median(present) * scale:.0f} ms", f"{max(present) * scale:.0f} ms"


METRICS = [
    ("freeze window, guest (FIFREEZE..FITHAW + hook)", "freeze_window_ms", "ms"),
    ("snapshot call, host (`freeze_seconds`)", "snapshot_call_s", "s>ms"),
    ("longest write stall, snapshot phase", "stall_snapshot_ms", "ms"),
    ("longest write stall, commit phase", "stall_commit_ms", "ms"),
    ("longest write stall, idle (reference)", "stall_idle_ms", "ms"),
    ("typical gap between records, idle (reference)", "gap_idle_median_ms", "ms"),
    ("start of `kvm-borg` to before_snapshot, host", "start_to_snapshot_s", "s>ms"),
    ("after_snapshot to before_commit (staging + borg), host", "store_s", "s>ms"),
    ("commit + pivot, host (`commit_seconds`)", "commit_s", "s>ms"),
    ("whole backup, host", "total_s", "s"),
]


def render(runs: list[Run], modes: list[str], args, description: str, manifest: dict) -> str:
    head = "| metric | " + " | ".join(f"{m}: median | {m}: max" for m in modes) + " |"
    sep = "|---|" + "---:|---:|" * len(modes)
    rows = []
    for label, attr, unit in METRICS:
        cells = []
        for mode in modes:
            cells.extend(_fmt([getattr(r, attr) for r in runs if r.mode == mode], unit))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    per_run = "\n".join(
        f"| {i + 1} | {r.mode} | {r.consistency} | {'-' if r.freeze_window_ms is None else round(r.freeze_window_ms)} "
        f"| {r.snapshot_call_s * 1000:.0f} | {r.stall_snapshot_ms:.0f} | {r.stall_commit_ms:.0f} "
        f"| {r.stall_idle_ms:.0f} | {r.commit_s * 1000:.0f} | {r.total_s:.2f} |"
        for i, r in enumerate(runs)
    )
    counts = ", ".join(f"{sum(r.mode == m for r in runs)} × quiesce={m}" for m in modes)
    return f"""# Guest impact of a backup (freeze window, write stalls)

Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by
`python -m bench.guest_impact --runs {args.runs} --modes {','.join(modes)} --interval-ms {args.interval_ms}
--size-mib {args.size_mib} --fmt {args.fmt}` ({counts}).

Machine: {description}. Guest: TCG, 1 vCPU, 256 MiB, kernel {manifest.get('kernel_version')},
qemu-ga {manifest.get('qemu-guest-agent')}; data disk {args.size_mib} MiB {args.fmt} (ext4); the
workload fsync()s one 64-byte record every {args.interval_ms} ms (a "stall" is the gap between two
consecutive durable records, so an undisturbed guest shows ~{args.interval_ms} ms + fsync time).

{head}
{sep}
{chr(10).join(rows)}

Per run (ms unless noted):

| run | mode | consistency | freeze window | snapshot call | stall snapshot | stall commit | stall idle | commit \
| backup (s) |
|---:|---|---|---:|---:|---:|---:|---:|---:|---:|
{per_run}
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="backups per quiesce mode")
    parser.add_argument("--modes", default="auto,off", help="comma-separated quiesce modes (auto, off, required)")
    parser.add_argument("--interval-ms", type=int, default=20, help="the workload's pause between records")
    parser.add_argument("--size-mib", type=int, default=64, help="data disk size")
    parser.add_argument("--fmt", default="qcow2", choices=["qcow2", "raw"])
    parser.add_argument("--idle-s", type=float, default=2.0, help="idle pause before each backup (reference window)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--name", default=DOMAIN, help="the guest domain's name")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, modes: list[str]) -> tuple[list[Run], str, dict]:
    """Given the parsed options and the quiesce modes, boot the guest, back it up `args.runs` times per
    mode (alternating), remove everything; return (the runs, the machine description, the guest manifest)."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("qemu:///system")
    artifacts = build.build_guest_artifacts()
    workdir = build.make_scratch_dir("bench-guest-")
    build.remove_guest(conn, args.name)
    runs: list[Run] = []
    try:
        guest = build.start_guest(conn, args.name, artifacts, workdir, args.fmt, args.size_mib,
                                  interval_ms=args.interval_ms)
        build.wait_for_agent(guest.dom, timeout=180)
        build.wait_for_progress(guest.console_log, 20, timeout=120)
        watcher = ConsoleWatcher(guest.console_log)
        watcher.start()
        configs = {m: write_config(workdir / f"kb-{m}", repo_path=workdir / "repo", plugins=("guest.timing_plugin",),
                                   quiesce=m, init=(m == modes[0]))
                   for m in modes}
        try:
            for n in range(args.runs):
                for mode in (modes if n % 2 == 0 else modes[::-1]):
                    run = one_backup(configs[mode], guest, watcher, mode, workdir / "timing.jsonl", args.idle_s)
                    runs.append(run)
                    print(f"guest run {len(runs)}: quiesce={mode} consistency={run.consistency} "
                          f"freeze window={run.freeze_window_ms} ms, stalls snapshot/commit/idle="
                          f"{run.stall_snapshot_ms:.0f}/{run.stall_commit_ms:.0f}/{run.stall_idle_ms:.0f} ms, "
                          f"backup {run.total_s:.2f}s", flush=True)
        finally:
            watcher.stop.set()
        description = machine_description(conn).replace("kvm guests", "KVM available but this guest is TCG")
    finally:
        cleanup = libvirt.open("qemu:///system")  # a new connection: the first one dies if libvirtd restarts
        try:
            build.remove_guest(cleanup, args.name)
            remove_domain(cleanup, args.name)  # remove_guest ignores a failed destroy: retry, then insist
        finally:
            cleanup.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return runs, description, artifacts.manifest


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs, description, manifest = measure(args, modes)
    report = render(runs, modes, args, description, manifest)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
