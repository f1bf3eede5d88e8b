"""Full and live restore against the repositories' own tools, paired and cold.

    sudo /opt/kvm-borg/venv/bin/python -m bench restore [--data-mib 2048] [--disk-mib 4096] [--runs 3]
        [--live-runs 2] [--workdir DIR] [--cache-dir DIR] [--output FILE] [--json FILE] [--no-drop-caches]

One qcow2 image (bench/dataset.py: an ext4 file system of real and generated files, cached in
--cache-dir) is the disk of a shut-off domain, backed up once into a borg and once into a restic
repository with `kvm-borg backup`. Then, each run with the page cache dropped first (`sync; echo 3 >
/proc/sys/vm/drop_caches`) and the variants of a group in alternating order:

- borg: `kvm-borg restore DOMAIN --disk vda --to FILE` against `borg extract --sparse` + `sync FILE`
  (kvm-borg fsyncs what it restored, borg leaves it to the kernel);
- restic: the same `kvm-borg restore` from the restic repository against `restic dump SNAP PATH > FILE`
  + `sync FILE` and `restic restore SNAP --target DIR --include PATH` + `sync FILE`;
- live: `kvm-borg restore DOMAIN --live --name COPY --target-dir DIR --json` (its `running_after_seconds`
  and `seconds`) against the full restore of the whole domain, `restore DOMAIN --name COPY2 --target-dir
  DIR2` (borg repository; the copy is destroyed and undefined after each run).

Every restored image is compared with the source (`cmp`) and its allocated bytes recorded. The report
gives each variant's median seconds and MiB/s, the ratios of the medians and the issue's targets, each
marked met or missed: kvm-borg ≥ 0.95× the throughput of `borg extract --sparse` + `sync`; the restic
path's writer negligible (≥ 0.95× `restic dump` + `sync`); time to a running copy ≤ 10 s and ≤ 0.25× the
full restore; pull done ≤ 1.3× the full restore.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import libvirt

from bench import variants as v
from bench.common import (
    BORG,
    KVM_BORG,
    RESTIC,
    MiB,
    ReferenceDomain,
    allocated_bytes,
    machine_description,
    median,
    prepare_workdir,
    remove_domain,
    remove_workdir,
    run,
    virt_type,
)
from bench.dataset import DEFAULT_CACHE, build_dataset, working_copy

BORG_GOAL = 0.95  # kvm-borg's throughput / borg extract --sparse + sync
RESTIC_GOAL = 0.95  # kvm-borg's throughput / restic dump > file + sync: the writer costs next to nothing
RUNNING_SECONDS_GOAL = 10.0
RUNNING_RATIO_GOAL = 0.25  # time to a running copy / full restore
PULL_RATIO_GOAL = 1.3  # live restore done / full restore


DROP_CACHES = True  # --no-drop-caches (the smoke test on a shared machine) clears it


def drop_caches() -> None:
    """Write every dirty page and drop the page cache, so that each run reads the repository cold."""
    os.sync()
    if DROP_CACHES:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(argv, *, env, cwd=None, stdout=None) -> tuple[float, subprocess.CompletedProcess]:
    """Given an argv, run it (stdout to a file if given), raise if it fails; return (seconds, the process)."""
    started = time.perf_counter()
    proc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE,
                          text=stdout is None)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(map(str, argv[:3]))}... exited {proc.returncode}: {err[-2000:]}")
    return seconds, proc


def make_domain(conn: libvirt.virConnect, name: str, disk: Path) -> None:
    """Given a connection, a name and a qcow2 image, define a shut-off domain with that image as vda."""
    xml = f"""<domain type='{virt_type()}'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk><memballoon model='none'/></devices></domain>"""
    conn.defineXML(xml)


def restic_snapshot(bench: v.Bench, repo: Path, archive: str) -> str:
    """Given a restic repository and a kvm-borg archive name, return the id of the archive's main snapshot."""
    out = run(RESTIC, "snapshots", "--json", "--tag", f"archive={archive}",
              env={**bench.env, "RESTIC_REPOSITORY": str(repo)}, ok=(0,)).stdout
    [snapshot] = [s for s in json.loads(out) if "part=main" in (s.get("tags") or [])]
    return snapshot["id"]


class Restores:
    """The restore variants of one benchmark: each writes the disk image to a fresh path and returns
    (seconds, path of the image written)."""

    def __init__(self, bench: v.Bench, source: Path, borg: tuple[Path, Path, str], restic: tuple[Path, Path, str]):
        self.bench, self.source = bench, source
        self.image_path = str(source).lstrip("/")  # the snapshot method stores the image at its own path
        self.borg_repo, self.borg_config, self.borg_archive = borg
        self.restic_repo, self.restic_config, self.restic_archive = restic
        self.restic_id = restic_snapshot(bench, self.restic_repo, self.restic_archive)
        self.out = bench.workdir / "out"

    def _fresh(self) -> Path:
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir()
        return self.out

    def kvm_borg(self, config: Path, archive: str) -> tuple[float, Path]:
        target = self._fresh() / "vda.qcow2"
        seconds, _ = timed([KVM_BORG, "--config", config, "-q", "restore", self.bench.domain.name, "--archive",
                            archive, "--disk", "vda", "--to", target], env=self.bench.env)
        return seconds, target

    def kvm_borg_borg(self) -> tuple[float, Path]:
        return self.kvm_borg(self.borg_config, self.borg_archive)

    def kvm_borg_restic(self) -> tuple[float, Path]:
        return self.kvm_borg(self.restic_config, self.restic_archive)

    def borg_extract(self) -> tuple[float, Path]:
        out = self._fresh()
        target = out / self.image_path
        seconds, _ = timed([BORG, "extract", "--sparse", f"{self.borg_repo}::{self.borg_archive}", self.image_path],
                           env=self.bench.env, cwd=out)
        synced, _ = timed(["sync", target], env=self.bench.env)
        return seconds + synced, target

    def restic_dump(self) -> tuple[float, Path]:
        target = self._fresh() / "vda.qcow2"
        env = {**self.bench.env, "RESTIC_REPOSITORY": str(self.restic_repo)}
        with open(target, "wb") as handle:
            seconds, _ = timed([RESTIC, "dump", "-q", self.restic_id, "/" + self.image_path], env=env, stdout=handle)
        synced, _ = timed(["sync", target], env=env)
        return seconds + synced, target

    def restic_restore(self) -> tuple[float, Path]:
        out = self._fresh()
        target = out / self.image_path
        env = {**self.bench.env, "RESTIC_REPOSITORY": str(self.restic_repo)}
        seconds, _ = timed([RESTIC, "restore", "-q", self.restic_id, "--target", out, "--include",
                            "/" + self.image_path], env=env)
        synced, _ = timed(["sync", target], env=env)
        return seconds + synced, target


GROUPS = {
    "borg": ("kvm-borg (borg)", "borg extract --sparse + sync"),
    "restic": ("kvm-borg (restic)", "restic dump > file + sync", "restic restore + sync"),
}


def measure_full(restores: Restores, runs: int) -> dict:
    """Given the variants and the number of runs, run each group's variants in alternating order, cold;
    return {variant: [{"seconds", "size", "allocated", "identical"}]}."""
    calls = {"kvm-borg (borg)": restores.kvm_borg_borg, "borg extract --sparse + sync": restores.borg_extract,
             "kvm-borg (restic)": restores.kvm_borg_restic, "restic dump > file + sync": restores.restic_dump,
             "restic restore + sync": restores.restic_restore}
    figures: dict[str, list] = {name: [] for name in calls}
    for n in range(runs):
        for group in GROUPS.values():
            order = group if n % 2 == 0 else group[::-1]
            for name in order:
                drop_caches()
                seconds, target = calls[name]()
                identical = run("cmp", "-s", restores.source, target, ok=(0, 1)).returncode == 0
                entry = {"seconds": seconds, "size": target.stat().st_size, "allocated": allocated_bytes(target),
                         "identical": identical}
                figures[name].append(entry)
                print(f"full {n + 1}/{runs} {name:<30} {seconds:7.2f}s {entry['size'] / MiB / seconds:7.0f} MiB/s "
                      f"allocated {entry['allocated'] / MiB:.0f} MiB{'' if identical else ' DIFFERENT'}",
                      file=sys.stderr, flush=True)
    shutil.rmtree(restores.out, ignore_errors=True)
    return figures


def measure_live(conn: libvirt.virConnect, bench: v.Bench, config: Path, archive: str, runs: int) -> dict:
    """Given a connection, the Bench, the borg config and archive and the number of runs, alternate the live
    restore and the full restore of the whole domain under new names, cold; return {"live": [{"running",
    "seconds"}], "full": [{"seconds"}]}."""
    figures: dict[str, list] = {"live": [], "full": []}
    base = f"{bench.domain.name}-copy"
    for n in range(runs):
        for kind in (("live", "full") if n % 2 == 0 else ("full", "live")):
            name, directory = f"{base}-{kind}", bench.workdir / f"copy-{kind}"
            remove_domain(conn, name)
            shutil.rmtree(directory, ignore_errors=True)
            drop_caches()
            argv = [KVM_BORG, "--config", config, "-q", "restore", bench.domain.name, "--archive", archive,
                    "--name", name, "--target-dir", directory, "--json"] + (["--live"] if kind == "live" else [])
            try:
                seconds, proc = timed(argv, env=bench.env)
                if kind == "live":
                    result = json.loads(proc.stdout)
                    entry = {"running": result["running_after_seconds"], "seconds": result["seconds"],
                             "wall": seconds}
                else:
                    entry = {"seconds": seconds}
            finally:
                remove_domain(conn, name)
                shutil.rmtree(directory, ignore_errors=True)
            figures[kind].append(entry)
            print(f"live {n + 1}/{runs} {kind:<4} " + ", ".join(f"{k} {x:.2f}s" for k, x in entry.items()),
                  file=sys.stderr, flush=True)
    return figures


def measure(conn: libvirt.virConnect, args) -> dict:
    """Given a connection and the parsed arguments, build the domain and both archives, run the full and the
    live restores and remove what was made; return the figures."""
    workdir = prepare_workdir(args.workdir)
    name = args.name
    load_at_start = os.getloadavg()[0]
    try:
        dataset = build_dataset(args.cache_dir, args.data_mib, args.disk_mib)
        (workdir / "source").mkdir()
        os.chmod(workdir / "source", 0o755)
        disk = working_copy(dataset, workdir / "source" / "vda.qcow2")
        make_domain(conn, name, disk)
        bench = v.Bench(ReferenceDomain(name, disk, workdir, dataset.data_bytes, dataset.disk_bytes), workdir,
                        uri=args.uri)
        archives = {}
        for kind in ("borg", "restic"):
            repo = (v.init_borg if kind == "borg" else v.init_restic)(bench, workdir / f"{kind}-repo")
            config = v.kvm_borg_config(bench, repo, kind)
            result = v.kvm_borg_backup(bench, config)
            archives[kind] = (repo, config, result["stores"][0]["archive"])
            print(f"backed up {disk.stat().st_size / MiB:.0f} MiB into {kind}: {archives[kind][2]}",
                  file=sys.stderr, flush=True)
        restores = Restores(bench, disk, archives["borg"], archives["restic"])
        full = measure_full(restores, args.runs)
        live = measure_live(conn, bench, archives["borg"][1], archives["borg"][2], args.live_runs) \
            if args.live_runs else {"live": [], "full": []}
        return {"image": disk.stat().st_size, "image_allocated": allocated_bytes(disk),
                "data_bytes": dataset.data_bytes, "disk_bytes": dataset.disk_bytes, "full": full, "live": live,
                "load": [load_at_start, os.getloadavg()[0]], "runs": args.runs, "live_runs": args.live_runs,
                "dropped": DROP_CACHES}
    finally:
        for leftover in (name, f"{name}-copy-live", f"{name}-copy-full"):
            remove_domain(conn, leftover)
        remove_workdir(workdir)


# --- the report ----------------------------------------------------------------------------------


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def targets(figures: dict) -> list[dict]:
    """Given measure()'s figures, return the targets: {what, value, goal, met}."""
    full = figures["full"]

    def seconds(name):
        return median([r["seconds"] for r in full[name]]) if full.get(name) else None

    rows = []
    pairs = (("kvm-borg (borg)", "borg extract --sparse + sync", BORG_GOAL),
             ("kvm-borg (restic)", "restic dump > file + sync", RESTIC_GOAL))
    for ours, theirs, goal in pairs:
        if seconds(ours) and seconds(theirs):
            ratio = seconds(theirs) / seconds(ours)  # same bytes: the throughput ratio
            rows.append({"what": f"{ours} throughput / {theirs}", "value": f"{ratio:.3f}×", "goal": f"≥ {goal}×",
                         "met": ratio >= goal})
    live, whole = figures["live"]["live"], figures["live"]["full"]
    if live and whole:
        running = median([r["running"] for r in live])
        done = median([r["seconds"] for r in live])
        full_s = median([r["seconds"] for r in whole])
        rows.append({"what": "live: time to a running copy", "value": f"{running:.2f} s",
                     "goal": f"≤ {RUNNING_SECONDS_GOAL:g} s", "met": running <= RUNNING_SECONDS_GOAL})
        rows.append({"what": "live: time to a running copy / full restore", "value": f"{running / full_s:.3f}×",
                     "goal": f"≤ {RUNNING_RATIO_GOAL}×", "met": running / full_s <= RUNNING_RATIO_GOAL})
        rows.append({"what": "live: pull done / full restore", "value": f"{done / full_s:.3f}×",
                     "goal": f"≤ {PULL_RATIO_GOAL}×", "met": done / full_s <= PULL_RATIO_GOAL})
    return rows


def render(figures: dict, command: str, machine: str) -> str:
    """Given measure()'s figures, the command line and the machine's description, return the Markdown report."""
    image = figures["image"]
    rows = ["| variant | median (s) | MiB/s | runs (s) | allocated (MiB) | identical |", "|---|---:|---:|---|---:|---|"]
    for name, results in figures["full"].items():
        if not results:
            continue
        med = median([r["seconds"] for r in results])
        each = ", ".join(f"{r['seconds']:.2f}" for r in results)
        rows.append(f"| {name} | {med:.2f} | {image / MiB / med:.0f} | {each} | "
                    f"{median([r['allocated'] for r in results]) / MiB:.0f} | "
                    f"{'yes' if all(r['identical'] for r in results) else 'NO'} |")
    live_rows = []
    live, whole = figures["live"]["live"], figures["live"]["full"]
    if live and whole:
        live_rows = ["| run | live: running after (s) | live: done (s) | full restore of the domain (s) |",
                     "|---:|---:|---:|---:|"]
        live_rows += [f"| {n + 1} | {a['running']:.2f} | {a['seconds']:.2f} | {b['seconds']:.2f} |"
                      for n, (a, b) in enumerate(zip(live, whole))]
    target_rows = ["| target | measured | goal | |", "|---|---:|---:|---|"]
    target_rows += [f"| {t['what']} | {t['value']} | {t['goal']} | **{_verdict(t['met'])}** |"
                    for t in targets(figures)]
    return f"""# Restore: kvm-borg against borg's and restic's own tools, and the live restore

Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}`.

Machine: {machine}; 1-minute load average {figures['load'][0]:.1f} at the start, {figures['load'][1]:.1f} at the end.

One qcow2 image of {image / MiB:.0f} MiB ({figures['image_allocated'] / MiB:.0f} MiB allocated; an ext4 file system
holding {figures['data_bytes'] / MiB:.0f} MiB of files in {figures['disk_bytes'] / MiB:.0f} MiB), the disk of a shut-off
domain, backed up once into borg and once into restic by `kvm-borg backup`. Each run starts with the page cache
dropped; the variants of a group alternate their order; {figures['runs']} runs each. Times include writing the
image to disk (`sync` after the tools that leave that to the kernel; kvm-borg fsyncs).{"" if figures.get("dropped", True) else " (page cache NOT dropped: --no-drop-caches)"}

## Full restore of one disk (`restore --disk vda --to FILE`)

{chr(10).join(rows)}

## Live restore against the full restore of the domain

{chr(10).join(live_rows) if live_rows else "(not run: --live-runs 0)"}

## Targets

{chr(10).join(target_rows)}
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench restore")
    parser.add_argument("--data-mib", type=int, default=2048, help="MiB of files in the image (default 2048)")
    parser.add_argument("--disk-mib", type=int, default=4096, help="its virtual size in MiB (default 4096)")
    parser.add_argument("--runs", type=int, default=3, help="full-restore runs per variant (default 3)")
    parser.add_argument("--live-runs", type=int, default=2, help="live and full restores of the domain (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/lib/kvm-borg-bench-restore"))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the image is cached")
    parser.add_argument("--output", type=Path, help="write the Markdown report there instead of printing it")
    parser.add_argument("--json", type=Path, help="also write the figures there as JSON")
    parser.add_argument("--name", default=f"kbbench-restore-{os.getpid()}", help="the source domain's name")
    parser.add_argument("--no-drop-caches", action="store_true", help="only sync before each run (a shared host)")
    parser.add_argument("--uri", default="qemu:///system")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    global DROP_CACHES
    args = parse_args(argv)
    DROP_CACHES = not args.no_drop_caches
    if os.geteuid() != 0:
        raise SystemExit("run me as root (libvirt qemu:///system, drop_caches)")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "domain not found" while cleaning up is expected
    conn = libvirt.open(args.uri)
    try:
        figures = measure(conn, args)
        report = render(figures, "python -m bench restore " + " ".join(argv), machine_description(conn))
    finally:
        conn.close()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if args.output:
        args.output.write_text(report)
    else:
        print(report)
    return 0
