"""The fixed cost of one `kvm-borg backup`, and its paired overhead against the plain sequence.

    sudo /opt/kvm-borg/venv/bin/python -m bench fixed-cost [--runs 7] [--data-mib 16] [--disk-mib 128]

On a small running domain (bench.common's reference domain: one qcow2 disk holding an ext4 of real
files), the plain sequence and `kvm-borg backup` alternate (bench/spine.py's paired runs, each into a
fresh local borg repository). Every kvm-borg run is timed at these points, all on the wall clock:

  start         just before the benchmark spawns `kvm-borg` (so the fork and exec are included);
  first libvirt the first virConnectOpen* of the process, as libvirt's client library logs it
                (LIBVIRT_LOG_OUTPUTS, debug level for the `libvirt` module only: a handful of lines);
  hooks         before/after the snapshot, after each repository stored, before/after the merge
                back: the notifications, stamped by bench/timing_probe.py (a kvm-borg plugin);
  exit          when the benchmark sees the process end.

kvm-borg's own fixed cost = (start → first libvirt call) + (last repository stored → exit), the
latter minus the merge back (blockcommit + pivot, which the plain sequence does as well and which is
shown apart). The per-run table shows every stretch. Writes docs/performance/fixed-cost.md; the whole
suite (`python -m bench`) runs this case as its phase `fixed-cost`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import libvirt

from bench import variants as v
from bench.common import KVM_BORG, build_reference_domain, machine_description, median, prepare_workdir, remove_domain, \
    remove_workdir
from bench.spine import paired_runs
from bench.timing_probe import LOG_ENV

FIXED_COST_TARGET_S = 0.15
OVERHEAD_TARGET = 1.05
# One libvirt client log line: "2026-12-01 15:26:42.336+0000: 12923: debug : virConnectOpen:1196 : name=..."
_LIBVIRT_OPEN = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\+0000: \d+: \w+ : virConnectOpen", re.M)
# (column, label) of the per-run table, in the order of a backup.
STRETCHES = (
    ("head", "start → first libvirt call"),
    ("plan", "first libvirt call → snapshot (plan, lock, capture)"),
    ("snapshot", "snapshot"),
    ("store", "snapshot → last repository stored"),
    ("store_to_commit", "last repository stored → merge back starts"),
    ("commit", "merge back (blockcommit, pivot)"),
    ("tail", "merge back done → exit"),
)


def first_libvirt_call(libvirt_log: str) -> float | None:
    """Given the text of a libvirt client log, return the wall-clock time (epoch seconds) of its first
    virConnectOpen* line, or None when there is none."""
    match = _LIBVIRT_OPEN.search(libvirt_log)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


def stretches(start: float, exit_: float, first_call: float, hook_log: str) -> dict[str, float]:
    """Given a kvm-borg run's start and exit, its first libvirt call (epoch seconds) and the JSON lines of
    bench/timing_probe.py, return the seconds of each of STRETCHES plus `fixed` (kvm-borg's own fixed cost:
    head + store_to_commit + tail), `fixed_with_commit` (head + last repository stored → exit) and
    `cpu_to_snapshot` (the CPU seconds kvm-borg itself used from its start to the snapshot: start-up, imports,
    config, plugins, the first libvirt calls and the plan; far less sensitive to the machine's load than the
    wall-clock stretches)."""
    marks: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for line in hook_log.splitlines():
        mark = json.loads(line)
        if mark["hook"] == "after_store" or mark["hook"] not in marks:  # the last store, the first of the others
            marks[mark["hook"]] = mark["t"]
            cpu[mark["hook"]] = mark.get("cpu", float("nan"))
    stored = marks["after_store"]
    out = {"head": first_call - start, "plan": marks["before_snapshot"] - first_call,
           "snapshot": marks["after_snapshot"] - marks["before_snapshot"],
           "store": stored - marks["after_snapshot"], "store_to_commit": marks["before_commit"] - stored,
           "commit": marks["after_commit"] - marks["before_commit"], "tail": exit_ - marks["after_commit"]}
    out["fixed"] = out["head"] + out["store_to_commit"] + out["tail"]
    out["cpu_to_snapshot"] = cpu["before_snapshot"]  # kvm-borg's own CPU from its start to the snapshot
    out["fixed_with_commit"] = out["head"] + exit_ - stored
    return out


def probed_backup(bench: v.Bench, repo: Path) -> dict:
    """Given a Bench and a fresh borg repository, run one `kvm-borg backup` into it with the timing probe;
    return {"seconds": wall time, "stretches": stretches(...)}."""
    config = v.kvm_borg_config(bench, repo, "borg", plugins=("bench.timing_probe",))
    # Steady state, as every nightly run of an unchanged config: its parse and its validation are remembered
    # (kvm_borg.config_cache); the first run after a change pays the YAML parser and the schema check once
    # more (~0.1 s here).
    subprocess.run([KVM_BORG, "--config", str(config), "-q", "config", "validate"], env=bench.env,
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    hook_log, libvirt_log = repo.with_name(repo.name + ".hooks.jsonl"), repo.with_name(repo.name + ".libvirt.log")
    env = {LOG_ENV: str(hook_log), "LIBVIRT_LOG_FILTERS": "1:libvirt", "LIBVIRT_LOG_OUTPUTS": f"1:file:{libvirt_log}"}
    try:
        start, started = time.time(), time.perf_counter()
        v.kvm_borg_backup(bench, config, env)
        seconds, exit_ = time.perf_counter() - started, time.time()
        first_call = first_libvirt_call(libvirt_log.read_text(errors="replace"))
        if first_call is None:
            raise RuntimeError(f"{libvirt_log}: libvirt logged no virConnectOpen")
        return {"seconds": seconds, "stretches": stretches(start, exit_, first_call, hook_log.read_text())}
    finally:
        hook_log.unlink(missing_ok=True)
        libvirt_log.unlink(missing_ok=True)


def measure(conn: libvirt.virConnect, workdir: Path, name: str, runs: int, data_mib: int, disk_mib: int,
            uri: str = "qemu:///system") -> dict:
    """Given a libvirt connection, a scratch directory, a domain name and the sizes, build the small domain,
    run `runs` paired rounds and remove the domain; return the figures (JSON-ready; `load`: the 1-minute
    load average at the start and at the end)."""
    remove_domain(conn, name)
    load_at_start = os.getloadavg()[0]
    try:
        domain = build_reference_domain(conn, workdir / "fixed-ref", name, data_mib, disk_mib)
        bench = v.Bench(domain, workdir, uri=uri)
        pairs = paired_runs(bench, runs, lambda repo: probed_backup(bench, repo))
        return {"runs": runs, "data": domain.data_bytes, "disk": domain.disk_bytes,
                "image": domain.disk.stat().st_size, "plain": pairs["plain"], "kvm-borg": pairs["kvm-borg"],
                "load": [load_at_start, os.getloadavg()[0]], "install": install_kind()}
    finally:
        remove_domain(conn, name)


def install_kind() -> str:
    """Return how the kvm-borg this benchmark runs is installed: "installed" (a package in site-packages, as
    scripts/setup.sh makes without --dev) or "editable" (imported from a source checkout: an editable
    install's import finder costs every start-up tens of ms a packaged install does not pay)."""
    import kvm_borg  # noqa: PLC0415

    return "installed" if "site-packages" in Path(kvm_borg.__file__).parts else "editable"


def summary(figures: dict) -> dict:
    """Given measure()'s figures, return the medians: {"fixed", "fixed_with_commit", "overhead" (ratio of the
    medians), "paired" (median of the paired ratios), "plain", "kvm-borg", each stretch}."""
    plain = [r["seconds"] for r in figures["plain"]]
    kvm = [r["seconds"] for r in figures["kvm-borg"]]
    out = {key: median([r["stretches"][key] for r in figures["kvm-borg"]])
           for key in [k for k, _ in STRETCHES] + ["fixed", "fixed_with_commit", "cpu_to_snapshot"]}
    out.update({"plain": median(plain), "kvm-borg": median(kvm), "overhead": median(kvm) / median(plain),
                "paired": median([k / p for k, p in zip(kvm, plain)])})
    return out


def targets(figures: dict) -> list[dict]:
    """Given measure()'s figures, return the two targets as rows {target, figure, met}."""
    s = summary(figures)
    return [
        {"target": f"kvm-borg's own fixed cost per backup ≤ {FIXED_COST_TARGET_S:.2f} s (median)",
         "figure": f"{s['fixed']:.3f} s (start → first libvirt call {s['head']:.3f} s, after the last store "
                   f"{s['store_to_commit'] + s['tail']:.3f} s; with the merge back {s['fixed_with_commit']:.3f} s; kvm-borg's "
                   f"own CPU from its start to the snapshot {s['cpu_to_snapshot']:.3f} s)",
         "met": s["fixed"] <= FIXED_COST_TARGET_S},
        {"target": f"kvm-borg backup of a small domain ≤ {OVERHEAD_TARGET:.2f} × the plain sequence (medians)",
         "figure": f"{s['overhead']:.3f} × ({s['kvm-borg']:.2f} vs {s['plain']:.2f} s; median of paired ratios "
                   f"{s['paired']:.3f})",
         "met": s["overhead"] <= OVERHEAD_TARGET},
    ]


def render(figures: dict, command: str, machine: str) -> str:
    """Given measure()'s figures, the command line and the machine's description, return fixed-cost.md."""
    s = summary(figures)
    ms = lambda x: f"{x * 1000:.0f}"  # noqa: E731
    head = "| run | plain (s) | kvm-borg (s) | ratio | " + " | ".join(label + " (ms)" for _, label in STRETCHES) \
        + " | **own fixed cost (ms)** | CPU start → snapshot (ms) |"
    rows = [head, "|---:|" + "---:|" * (5 + len(STRETCHES))]
    for n, (p, k) in enumerate(zip(figures["plain"], figures["kvm-borg"])):
        cells = " | ".join(ms(k["stretches"][key]) for key, _ in STRETCHES)
        rows.append(f"| {n + 1} | {p['seconds']:.2f} | {k['seconds']:.2f} | {k['seconds'] / p['seconds']:.3f} | "
                    f"{cells} | {ms(k['stretches']['fixed'])} | {ms(k['stretches']['cpu_to_snapshot'])} |")
    cells = " | ".join(f"**{ms(s[key])}**" for key, _ in STRETCHES)
    rows.append(f"| **median** | **{s['plain']:.2f}** | **{s['kvm-borg']:.2f}** | **{s['paired']:.3f}** | {cells} | "
                f"**{ms(s['fixed'])}** | **{ms(s['cpu_to_snapshot'])}** |")
    verdicts = "\n".join(f"- {t['target']}: {t['figure']} — **{'met' if t['met'] else 'MISSED'}**"
                         for t in targets(figures))
    return f"""# Fixed cost of a backup

Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}`.

Machine: {machine}; 1-minute load average {figures['load'][0]:.1f} at the start, {figures['load'][1]:.1f} at the end
(on a busy machine every stretch grows: compare runs made at the same load). kvm-borg: {figures.get('install', 'editable')}
(a packaged install, as scripts/setup.sh makes without `--dev`, does not pay an editable install's import finder).

A small running domain: one qcow2 disk ({figures['disk'] / 2**20:.0f} MiB virtual, {figures['image'] / 2**20:.0f} MiB
image file) holding an ext4 with {figures['data'] / 2**20:.0f} MiB of real files. {figures['runs']} rounds; in each,
the plain sequence (`virsh snapshot-create-as --disk-only --atomic --no-metadata`, `borg create`, `virsh
blockcommit --active --pivot --wait`, `rm` the overlay) and `kvm-borg backup` (`quiesce: off`) run one after
the other, alternating order, each into a fresh encrypted local borg repository, the image cold.

kvm-borg's **own fixed cost** is the time it spends before its first libvirt call (Python start-up,
imports, config, plugins) plus the time after the last repository stored, not counting the merge back
(blockcommit + pivot), which the plain sequence does as well. The start and the exit are seen by the
benchmark (fork and exec included), the first libvirt call is libvirt's own client log line of
`virConnectOpen`, the other points are kvm-borg's plugin notifications stamped by
`bench/timing_probe.py` (a plugin that imports nothing heavy; the kvm-borg runs pay for it and for
libvirt's log). Each kvm-borg round's config was validated once before it (`kvm-borg config validate`,
untimed), as for every run of an unchanged config: what the YAML parser made of its text and its schema check
are remembered (`kvm_borg.config_cache`, in /run/kvm-borg), so such a run imports neither ruamel.yaml nor
fastjsonschema; the first run after a config change pays both once more (about 0.1 s on this host). How it is
measured: `bench/fixed_cost.py`. The last column is the CPU time kvm-borg itself used from its start to the
snapshot (`time.process_time()` in the probe: start-up, imports, config, plugins, the first libvirt calls, the
plan), which a loaded machine inflates far less than the wall-clock stretches.

{verdicts}

{chr(10).join(rows)}
"""


def main(argv=None) -> int:
    """`python -m bench fixed-cost`: measure, write the report (fixed-cost.md); return 0, or 1 with --strict
    when a target is missed."""
    parser = argparse.ArgumentParser(prog="python -m bench fixed-cost", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="paired rounds (plain sequence + kvm-borg)")
    parser.add_argument("--data-mib", type=int, default=16, help="real files on the small domain's ext4 (MiB)")
    parser.add_argument("--disk-mib", type=int, default=128, help="the small domain's virtual disk size (MiB)")
    parser.add_argument("--name", default="kvm-borg-bench-fixed", help="the small domain's name")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/kvm-borg-bench-fixed"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/performance/fixed-cost.md")
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "bench", "fixed-cost", *argv])
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(args.uri)
    workdir = prepare_workdir(args.workdir)
    try:
        figures = measure(conn, workdir, args.name, args.runs, args.data_mib, args.disk_mib, args.uri)
        machine = machine_description(conn)
    finally:
        remove_workdir(workdir)
        conn.close()
    report = render(figures, command, machine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    print(report)
    return 1 if args.strict and not all(t["met"] for t in targets(figures)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
