"""Many small domains: what `kvm-borg backup --all` costs per domain beyond the plain sequence, paired.

    sudo /opt/kvm-borg/venv/bin/python -m bench fleet [--domains 20] [--rounds 3] [--disk-mib 4] [--workdir DIR]

`--domains` small running domains (one raw disk each, filled with random data so nothing deduplicates between
them; bench/jobs.py's domains) are backed up into one borg repository, fresh for every run, two ways:

  plain     for each domain in turn, the sequence an administrator would script: `virsh snapshot-create-as
            --disk-only --atomic --no-metadata`, `borg create` (kvm-borg's options), `virsh blockcommit --active
            --pivot --wait`, `rm` the overlay;
  kvm-borg  one `kvm-borg backup --all` (`quiesce: off`, `method: snapshot`, `jobs: 1`), its config validated
            once before the round (untimed), as for every run of an unchanged config.

Each round runs both, alternating which goes first. Per round: (kvm-borg total - plain total) / domains is
kvm-borg's per-domain fixed cost beyond the plain sequence (issue 14's goal: <= 0.15 s), for the wall clock and
for the CPU time of the processes each way starts (kvm-borg and its borg children; virsh and borg: libvirtd's
and QEMU's work is in neither), which a loaded machine inflates far less. The figures are medians of the
rounds. The whole process start-up of kvm-borg is paid once, not per domain, so it is spread over the domains.
Prints a Markdown report (or writes it to --output, and the figures beside it as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import libvirt

from bench import variants as v
from bench.common import (
    BORG,
    KVM_BORG,
    machine_description,
    median,
    prepare_workdir,
    remove_domain,
    remove_workdir,
    run,
)
from bench.jobs import make_domain

GOAL_S = 0.15


def children_cpu() -> float:
    """Return the CPU seconds (user + system) of every finished child of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> dict:
    """Call fn(); return {"seconds": its wall time, "cpu": the CPU seconds of the children it ran}."""
    cpu, started = children_cpu(), time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - started, "cpu": children_cpu() - cpu}


def write_config(bench: v.Bench, repo: Path, names: list[str]) -> Path:
    """Given a Bench, a fresh borg repository and the domain names, write a kvm-borg config that takes exactly
    those domains with --all into that repository; return its path."""
    config = repo.with_name(repo.name + ".config.yaml")
    config.write_text(json.dumps({
        "state_dir": str(bench.workdir / "state"), "quiesce": "off", "method": "snapshot", "jobs": 1,
        "libvirt_uri": bench.uri, "domains": {"include": names},
        "repositories": [{"name": "fleet", "type": "borg", "path": str(repo), "passphrase_file": str(bench.passfile)}],
    }))
    return config


def plain_sequence(bench: v.Bench, repo: Path, names: list[str], disks: dict[str, Path]) -> None:
    """Given a Bench, a borg repository, the domain names and their disk images, back up each domain in turn
    the plain way (snapshot, `borg create`, blockcommit + pivot, rm the overlay)."""
    for name in names:
        disk = disks[name]
        overlay = disk.with_name(f"{disk.name}.plain-{bench.next_id()}.overlay")
        run("virsh", "-c", bench.uri, "snapshot-create-as", name, "--name", overlay.name, "--disk-only", "--atomic",
            "--no-metadata", "--diskspec", f"vda,file={overlay}", ok=(0,))
        try:
            run(BORG, "create", "--compression", "lz4", "--chunker-params", v.FIXED_CHUNKER,
                f"{repo}::{name}-{bench.counter}", disk, env=bench.env)  # 1: a warning
        finally:
            run("virsh", "-c", bench.uri, "blockcommit", name, "vda", "--active", "--pivot", "--wait", ok=(0,))
            overlay.unlink()


def kvm_borg_all(bench: v.Bench, config: Path, count: int) -> None:
    """Given a Bench, a config and how many domains it selects, run `kvm-borg backup --all --json`;
    RuntimeError unless every one of them was backed up."""
    proc = subprocess.run([KVM_BORG, "--config", str(config), "-q", "backup", "--all", "--json"], env=bench.env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    try:
        domains = json.loads(proc.stdout)["domains"]
    except (ValueError, KeyError):
        raise RuntimeError(f"kvm-borg backup exited {proc.returncode}: {proc.stderr[-2000:]}") from None
    if proc.returncode != 0 or len(domains) != count or not all(d["ok"] for d in domains):
        raise RuntimeError(f"kvm-borg backup exited {proc.returncode}: {proc.stderr[-2000:]}")


def one_round(bench: v.Bench, number: int, names: list[str], disks: dict[str, Path]) -> dict:
    """Given a Bench, the round's number, the domains and their disks, run both variants (order alternating
    with the round), each into a fresh borg repository; return {"plain": timed, "kvm-borg": timed}."""
    out = {}
    for variant in ("plain", "kvm-borg") if number % 2 == 0 else ("kvm-borg", "plain"):
        repo = v.init_borg(bench, bench.workdir / f"repo-{variant}-{number}")
        if variant == "plain":
            out[variant] = timed(lambda: plain_sequence(bench, repo, names, disks))
        else:
            config = write_config(bench, repo, names)
            subprocess.run([KVM_BORG, "--config", str(config), "-q", "config", "validate"], env=bench.env, check=True,
                           capture_output=True, stdin=subprocess.DEVNULL)  # the steady state: a remembered config
            out[variant] = timed(lambda: kvm_borg_all(bench, config, len(names)))
        run("rm", "-rf", repo, ok=(0,))
        print(f"round {number + 1} {variant:<9} {out[variant]['seconds']:7.2f} s (CPU {out[variant]['cpu']:.2f} s)",
              file=sys.stderr, flush=True)
    return out


def measure(conn: libvirt.virConnect, workdir: Path, domains: int, rounds: int, disk_mib: int,
            uri: str = "qemu:///system", prefix: str | None = None) -> dict:
    """Given a connection, a scratch directory, how many domains, rounds, the disk size and the domains' name
    prefix (default kbbench-fleet-PID), build the domains (PREFIX-00, PREFIX-01, ...), run the paired rounds and
    remove the domains; return {"domains", "disk_mib", "rounds": [one_round], "load": [start, end]}."""
    prefix = prefix or f"kbbench-fleet-{os.getpid()}"
    names = [f"{prefix}-{n:02d}" for n in range(domains)]
    load_at_start = os.getloadavg()[0]
    bench = v.Bench(None, workdir, uri=uri)
    disks = {name: workdir / f"dom{n:02d}" / "vda.raw" for n, name in enumerate(names)}
    results = []
    try:
        for name, disk in disks.items():
            make_domain(conn, disk.parent, name, disk_mib)
        for number in range(rounds):
            results.append(one_round(bench, number, names, disks))
    finally:
        for name in names:
            remove_domain(conn, name)
    return {"domains": domains, "disk_mib": disk_mib, "rounds": results, "load": [load_at_start, os.getloadavg()[0]]}


def per_domain(figures: dict, key: str) -> list[float]:
    """Given measure()'s figures and "seconds" or "cpu", return each round's (kvm-borg - plain) / domains."""
    return [(r["kvm-borg"][key] - r["plain"][key]) / figures["domains"] for r in figures["rounds"]]


def render(figures: dict, command: str, machine: str) -> str:
    """Given measure()'s figures, the command and the machine's description, return the Markdown report."""
    n = figures["domains"]
    rows = [("| round | plain (s) | kvm-borg (s) | ratio | per domain beyond plain (ms) | plain CPU (s) | "
             "kvm-borg CPU (s) | CPU per domain beyond plain (ms) |"), "|---:|" + "---:|" * 7]
    for i, r in enumerate(figures["rounds"]):
        p, k = r["plain"], r["kvm-borg"]
        rows.append(f"| {i + 1} | {p['seconds']:.2f} | {k['seconds']:.2f} | {k['seconds'] / p['seconds']:.3f} | "
                    f"{(k['seconds'] - p['seconds']) / n * 1000:.0f} | {p['cpu']:.2f} | {k['cpu']:.2f} | "
                    f"{(k['cpu'] - p['cpu']) / n * 1000:.0f} |")
    wall, cpu = median(per_domain(figures, "seconds")), median(per_domain(figures, "cpu"))
    ratio = median([r["kvm-borg"]["seconds"] / r["plain"]["seconds"] for r in figures["rounds"]])
    return f"""# Many small domains: `kvm-borg backup --all` vs the plain sequence per domain

Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}`.

Machine: {machine}; 1-minute load average {figures['load'][0]:.1f} at the start, {figures['load'][1]:.1f} at the end.

{n} running domains, one raw disk of {figures['disk_mib']} MiB random data each, backed up into one fresh encrypted
borg repository per run: the plain sequence (`virsh snapshot-create-as --disk-only --atomic --no-metadata`, `borg
create`, `virsh blockcommit --active --pivot --wait`, `rm` the overlay) for each domain in turn, against one `kvm-borg
backup --all` (`jobs: 1`, `quiesce: off`); the two alternate which goes first. CPU: the processes each way starts
(kvm-borg and its borg children; virsh and borg), not libvirtd's or QEMU's. How it is measured: `bench/fleet.py`.

{chr(10).join(rows)}

- kvm-borg's per-domain fixed cost beyond the plain sequence ≤ {GOAL_S:.2f} s (median of the rounds' (kvm-borg total −
  plain total) / {n}): **{wall:.3f} s** — **{'met' if wall <= GOAL_S else 'MISSED'}**; in CPU time {cpu:.3f} s per domain.
- Ratio kvm-borg / plain (median of the rounds): {ratio:.3f}.
"""


def main(argv: list[str]) -> int:
    """`python -m bench fleet`: measure, print (or write) the report; return 0, or 1 with --strict when the goal
    is missed."""
    parser = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-mib", type=int, default=4, help="each domain's raw disk (MiB of random data)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/kvm-borg-bench-fleet"))
    parser.add_argument("--output", type=Path, help="write the report there (and the figures as .json beside it)")
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--name", help="the domains' name prefix (default kbbench-fleet-PID)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the goal is missed")
    args = parser.parse_args(argv)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "domain not found" while cleaning up is expected
    conn = libvirt.open(args.uri)
    workdir = prepare_workdir(args.workdir)
    try:
        figures = measure(conn, workdir, args.domains, args.rounds, args.disk_mib, args.uri, args.name)
        report = render(figures, shlex.join(["python", "-m", "bench", "fleet", *argv]), machine_description(conn))
    finally:
        remove_workdir(workdir)
        conn.close()
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        args.output.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    print(report)
    return 1 if args.strict and median(per_domain(figures, "seconds")) > GOAL_S else 0
