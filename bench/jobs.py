"""Parallel domains: `kvm-borg backup --all --jobs 2` against `--jobs 1`, paired.

    sudo /opt/kvm-borg/venv/bin/python -m bench jobs [--rounds 3] [--disk-mib 32] [--workdir DIR]

Four small running domains (one raw disk each, filled with random data so nothing deduplicates between
them) are backed up with `--all` into three repositories at once: one restic and two borg repositories,
each fresh for every run (so both runs store the same amount). Each round runs `--jobs 1` and `--jobs 2`
one after the other, alternating which goes first; the figure is the median of the rounds' wall-time
ratios (jobs 2 / jobs 1). The issue's goal: ≤ 0.65× on 2 cores. Prints a Markdown report (or writes it
to --output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt

from bench import variants as v
from bench.common import KVM_BORG, MiB, machine_description, median, prepare_workdir, remove_domain, remove_workdir, \
    virt_type

DOMAINS = 4
GOAL = 0.65


def make_domain(conn: libvirt.virConnect, directory: Path, name: str, disk_mib: int) -> None:
    """Given a directory, a name and a size, create and start a domain with one raw disk of random data."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    disk = directory / "vda.raw"
    with open(disk, "wb") as handle:
        for _ in range(disk_mib):
            handle.write(os.urandom(MiB))
    xml = f"""<domain type='{virt_type()}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk></devices></domain>"""
    conn.defineXML(xml).create()


def write_config(bench: v.Bench, directory: Path, names: list[str]) -> Path:
    """Given a Bench, a fresh directory and the domain names, init a restic and two borg repositories in it
    and write a kvm-borg config taking the domains with --all into all three; return its path."""
    directory.mkdir(parents=True)
    restic = v.init_restic(bench, directory / "restic")
    borg_a, borg_b = v.init_borg(bench, directory / "borg-a"), v.init_borg(bench, directory / "borg-b")
    repositories = [{"name": "restic", "type": "restic", "url": str(restic), "passphrase_file": str(bench.passfile)}]
    repositories += [{"name": repo.name, "type": "borg", "path": str(repo), "passphrase_file": str(bench.passfile)}
                     for repo in (borg_a, borg_b)]
    config = directory / "config.yaml"
    config.write_text(json.dumps({"state_dir": str(bench.workdir / "state"), "quiesce": "off", "method": "snapshot",
                                  "libvirt_uri": bench.uri, "domains": {"include": names},
                                  "repositories": repositories}))
    return config


def cpu_jiffies() -> tuple[int, int]:
    """Return the host's (busy, total) CPU jiffies from /proc/stat's first line (busy: all but idle and iowait)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - fields[3] - fields[4], total


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Given two cpu_jiffies() readings, return the share of the host's CPU time that was busy between them."""
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def timed_run(bench: v.Bench, config: Path, jobs: int) -> tuple[float, float]:
    """Given a Bench, a config and `jobs`, run `kvm-borg backup --all --jobs N`; return (its wall time, the
    share of the host's CPU that was busy meanwhile) (RuntimeError if a domain failed)."""
    cpu_before = cpu_jiffies()
    started = time.perf_counter()
    proc = subprocess.run([KVM_BORG, "--config", str(config), "-q", "backup", "--all", "--jobs", str(jobs), "--json"],
                          env=bench.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    busy = busy_fraction(cpu_before, cpu_jiffies())
    try:
        domains = json.loads(proc.stdout)["domains"]
    except (ValueError, KeyError):
        raise RuntimeError(f"kvm-borg backup exited {proc.returncode}: {proc.stderr[-2000:]}") from None
    if proc.returncode != 0 or not all(d["ok"] for d in domains):
        raise RuntimeError(f"kvm-borg backup exited {proc.returncode}: {proc.stderr[-2000:]}")
    return seconds, busy


def measure(conn: libvirt.virConnect, workdir: Path, rounds: int, disk_mib: int) -> dict:
    """Given a connection, a scratch directory, the rounds and the disk size, build the domains, run the
    paired rounds and remove the domains; return {"rounds": [{"jobs1", "jobs2"}], "load": [start, end]}."""
    names = [f"kbbench-jobs-{os.getpid()}-{n}" for n in range(DOMAINS)]
    load_at_start = os.getloadavg()[0]
    bench = v.Bench(None, workdir)
    results = []
    try:
        for n, name in enumerate(names):
            make_domain(conn, workdir / f"dom{n}", name, disk_mib)
        for round_ in range(rounds):
            order = (1, 2) if round_ % 2 == 0 else (2, 1)
            seconds = {}
            for jobs in order:
                config = write_config(bench, workdir / f"round{round_}-jobs{jobs}", names)
                seconds[f"jobs{jobs}"], seconds[f"busy{jobs}"] = timed_run(bench, config, jobs)
            results.append(seconds)
            print(f"round {round_ + 1}: jobs 1 {seconds['jobs1']:.2f} s, jobs 2 {seconds['jobs2']:.2f} s, "
                  f"ratio {seconds['jobs2'] / seconds['jobs1']:.3f}, host CPU busy {seconds['busy1']:.0%} / "
                  f"{seconds['busy2']:.0%}", file=sys.stderr)
    finally:
        for name in names:
            remove_domain(conn, name)
    return {"rounds": results, "load": [load_at_start, os.getloadavg()[0]], "disk_mib": disk_mib}


def render(figures: dict, command: str, machine: str) -> str:
    """Given measure()'s figures, the command and the machine's description, return the Markdown report."""
    ratios = [r["jobs2"] / r["jobs1"] for r in figures["rounds"]]
    rows = ["| round | --jobs 1 (s) | --jobs 2 (s) | ratio | host CPU busy, --jobs 1 | host CPU busy, --jobs 2 |",
            "|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {n + 1} | {r['jobs1']:.2f} | {r['jobs2']:.2f} | {r['jobs2'] / r['jobs1']:.3f} | "
             f"{r['busy1']:.0%} | {r['busy2']:.0%} |" for n, r in enumerate(figures["rounds"])]
    ratio = median(ratios)
    return f"""# Parallel domains: `--jobs 2` vs `--jobs 1`

Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}`.

Machine: {machine}; 1-minute load average {figures['load'][0]:.1f} at the start, {figures['load'][1]:.1f} at the end.

{DOMAINS} running domains, one raw disk of {figures['disk_mib']} MiB random data each, `backup --all` into a restic and
two borg repositories (fresh for every run), `--jobs 1` and `--jobs 2` alternating which goes first.
"Host CPU busy" is the share of all cores' time that was not idle during the run (/proc/stat): near 100 %,
the stores already use every core and a second domain at once can only contend.

{chr(10).join(rows)}

Median of the paired ratios: **{ratio:.3f}×** (goal ≤ {GOAL}× on 2 cores: **{'met' if ratio <= GOAL else 'MISSED'}**).
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench jobs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-mib", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/var/lib/kvm-borg-bench-jobs"))
    parser.add_argument("--output", type=Path, help="write the report there instead of printing it")
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args(argv)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "domain not found" while cleaning up is expected
    conn = libvirt.open(args.uri)
    workdir = prepare_workdir(args.workdir)
    try:
        figures = measure(conn, workdir, args.rounds, args.disk_mib)
        report = render(figures, "python -m bench jobs " + " ".join(argv), machine_description(conn))
    finally:
        remove_workdir(workdir)
        conn.close()
    if args.output:
        args.output.write_text(report)
    else:
        print(report)
    return 0
