"""Changed-block backups (issue 15): the `bitmap` method next to the `snapshot` method, paired runs.

    sudo /opt/kvm-borg/venv/bin/python -m bench incremental [--quick] [--methods snapshot,bitmap] ...

One running domain (KVM, no OS booted: the disk is data) on a qcow2 disk of 16 GiB virtual size
holding >= 4 GiB of real files (bench/dataset.py, cached under /var/tmp/kvm-borg-bench-cache).
Phases (`--phases`):

  series  per round, a fresh repository per variant (method x backend), then the cases
          full         the first backup into the repository;
          unchanged    a repeat with nothing written;
          extents-4m   1 % of the disk rewritten in 4 MiB-aligned extents at random offsets;
          blocks-64k   1 % of the disk's 64 KiB blocks rewritten at random (the worst case);
          the writes go through the running VM's block layer (HMP qemu-io), so the dirty bitmap
          sees them, and every variant backs up the same disk state; variants alternate order.
  sweep   bitmap only: for each `--sweep-mib` segment size, a fresh repository per backend, a full
          backup, then the worst case (the same blocks for every size): time, bytes read,
          repository growth, borg/restic memory.
  view    bitmap only: `kvm-borg freeze --expose` of the domain, then the segment view's read
          throughput (`cat` of every segment file) next to `nbdcopy` of the backup job's NBD export.
  guest   the real test guest (tests/guest, TCG): the longest write stall and the record
          throughput of its fsync()ing workload while a backup runs, next to an idle window of
          the same length just before, per method.

Every measured run starts cold (the image evicted, `echo 3 > /proc/sys/vm/drop_caches`). Per run:
wall time, kvm-borg's own peak RSS (its `ru_maxrss` as bench/rss_probe.py records it), the segment view's, borg's and restic's peak RSS
(bench/procmem.py), bytes read (kvm-borg's `--json` per disk; the snapshot method reads the whole
image file), the bytes written since the last run (= the bitmap's dirty bytes: nothing else
writes to this disk), repository growth (`borg info` unique_csize / `restic stats --mode
raw-data`). Writes docs/performance/incremental.md and incremental.json; removes the domain, its
checkpoints, repositories and scratch files, also on failure or SIGTERM (which ends the run after
writing the report of the runs finished so far). `--render-only JSON` redraws the report from saved figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from bench import dataset as ds
from bench.common import BORG, KVM_BORG, RESTIC, KiB, MiB, evict_cache, machine_description, make_patterns, \
    prepare_workdir, remove_domain, remove_workdir, run, scattered_extents, virt_type, write_extents
from bench.procmem import run_measured
from bench.rss_probe import RSS_ENV
from bench.timing_probe import LOG_ENV as TIMING_ENV

PHASES = ("series", "sweep", "view", "guest")
CASES = ("full", "unchanged", "extents-4m", "blocks-64k")
PASSPHRASE = "bench-incremental-passphrase"
REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK = {"data_mib": 64, "disk_mib": 256, "rounds": 1, "sweep_mib": "0.25,1", "segment_mib": 1.0,
         "guest_runs": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench incremental", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes for iterating: 64 MiB of files on a 256 MiB disk, one round, "
                        "segment sizes 256 KiB and 1 MiB, one guest run per method")
    p.add_argument("--data-mib", type=int, default=4096, help="real files on the disk's ext4 (MiB)")
    p.add_argument("--disk-mib", type=int, default=16384, help="virtual size of the disk (MiB)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the series (fresh repositories each)")
    p.add_argument("--methods", default="snapshot,bitmap", help="methods compared")
    p.add_argument("--backends", default="borg,restic", help="repository types")
    p.add_argument("--segment-mib", type=float, default=4.0, help="segment size of the series' bitmap runs")
    p.add_argument("--sweep-mib", default="1,4,16", help="segment sizes of the sweep (MiB)")
    p.add_argument("--sweep-backends", default="", help="repository types of the sweep (default: --backends)")
    p.add_argument("--change-percent", type=float, default=1.0, help="percent of the disk each change case rewrites")
    p.add_argument("--guest-runs", type=int, default=3, help="backups of the real guest per method")
    p.add_argument("--guest-interval-ms", type=int, default=2, help="the guest workload's pause between records")
    p.add_argument("--guest-disk-mib", type=int, default=256, help="the guest's data disk")
    p.add_argument("--guest-boot-timeout", type=float, default=180,
                   help="seconds the guest may take to boot (TCG on a loaded host is slow)")
    p.add_argument("--guest-quiesce", default="auto", help="quiesce mode of the guest's backups")
    p.add_argument("--guest-pvh", action="store_true",
                   help="boot the guest's kernel through its PVH entry (tests/guest/pvh.py): the same kernel without "
                        "its TCG decompression, a faster boot; what is measured once it runs is unchanged")
    p.add_argument("--guest-idle-s", type=float, default=3.0,
                   help="idle window before each guest backup, the reference its stall is compared with (s)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"phases to run ({','.join(PHASES)})")
    p.add_argument("--no-drop-caches", action="store_true", help="only evict the image, not the whole page cache")
    p.add_argument("--name", default="kvm-borg-bench-incr", help="the domain's name (the guest's gets -guest)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/kvm-borg-bench-incremental"),
                   help="scratch directory (image copy, repositories, state); removed afterwards")
    p.add_argument("--cache-dir", type=Path, default=ds.DEFAULT_CACHE, help="where the dataset image is cached")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs/performance", help="where the report goes")
    p.add_argument("--uri", default="qemu:///system")
    p.add_argument("--render-only", type=Path, metavar="JSON[,JSON...]",
                   help="only redraw the report from incremental.json files (several: their runs merged)")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {a.dest: a.default for a in p._actions}
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return args


class Stop(Exception):
    """SIGTERM/SIGHUP: unwind so that every `finally` cleans up."""


def _on_signal(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def size_text(mib: float) -> str:
    """Given MiB (may be fractional), return a kvm-borg SIZE ("256KiB", "4MiB")."""
    kib = round(mib * 1024)
    return f"{kib // 1024}MiB" if kib % 1024 == 0 else f"{kib}KiB"


# --- the bench: domain, environment, one kvm-borg run ---------------------------------------------


class Bench:
    """What every run shares: the domain, the scratch directory, the environment, the state dir."""

    def __init__(self, args, conn, workdir: Path, image: Path, disk_bytes: int):
        self.args, self.conn, self.workdir, self.image, self.disk_bytes = args, conn, workdir, image, disk_bytes
        self.name = args.name
        self.state_dir = workdir / "state"  # one for all variants: bitmap runs share the domain's checkpoint
        self.scratch_dir = workdir / "scratch"
        self.scratch_dir.mkdir(exist_ok=True)
        os.chmod(self.scratch_dir, 0o1777)  # QEMU (libvirt-qemu) binds the NBD socket and writes scratch files
        self.passfile = workdir / "passphrase"
        self.passfile.write_text(PASSPHRASE)
        os.chmod(self.passfile, 0o600)
        base, cache = workdir / "borg-base", workdir / "restic-cache"
        base.mkdir(exist_ok=True)
        cache.mkdir(exist_ok=True)
        inherited = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self.env = {**inherited, "BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(base),
                    "RESTIC_PASSWORD_FILE": str(self.passfile), "RESTIC_CACHE_DIR": str(cache),
                    "PYTHONPATH": pythonpath}
        self.counter = 0

    def dom(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    def next_id(self) -> int:
        self.counter += 1
        return self.counter


def define_domain(conn, name: str, image: Path) -> libvirt.virDomain:
    """Define and start a disk-only domain (no OS) on the qcow2 `image`."""
    xml = f"""<domain type='{virt_type()}'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{image}'/>
      <target dev='vda' bus='virtio'/></disk></devices></domain>"""
    dom = conn.defineXML(xml)
    dom.create()
    return dom


def remove_bench_domain(uri: str, name: str) -> None:
    """Remove the domain (with its checkpoints' metadata) through a new connection."""
    conn = libvirt.open(uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        try:
            if dom.isActive():
                try:
                    dom.abortJob()
                except libvirt.libvirtError:
                    pass
            for checkpoint in dom.listAllCheckpoints():
                try:
                    checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                except libvirt.libvirtError:
                    pass
        except (libvirt.libvirtError, AttributeError):
            pass
        remove_domain(conn, name)
    finally:
        conn.close()


def drop_caches(bench: Bench, paths=()) -> None:
    """Evict the image (and `paths`) from the page cache; unless --no-drop-caches, drop the whole cache."""
    evict_cache(bench.image)
    for path in paths:
        evict_cache(path)
    if not bench.args.no_drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def init_repo(bench: Bench, kind: str, repo: Path) -> Path:
    if kind == "borg":
        run(BORG, "init", "--encryption", "repokey-blake2", repo, env=bench.env, ok=(0,))
    else:
        run(RESTIC, "init", "-q", env={**bench.env, "RESTIC_REPOSITORY": str(repo)}, ok=(0,))
    return repo


def repo_size(bench: Bench, kind: str, repo: Path) -> int:
    """The repository's stored size: borg `info` unique_csize, restic `stats --mode raw-data` total_size."""
    if kind == "borg":
        out = run(BORG, "info", "--json", repo, env=bench.env, ok=(0,)).stdout
        return int(json.loads(out)["cache"]["stats"]["unique_csize"])
    out = run(RESTIC, "stats", "--json", "--mode", "raw-data",
              env={**bench.env, "RESTIC_REPOSITORY": str(repo)}, ok=(0,)).stdout
    return int(json.loads(out)["total_size"])


def write_config(bench: Bench, path: Path, method: str, kind: str, repo: Path, segment_mib: float,
                 quiesce: str = "off") -> Path:
    """Write a kvm-borg config for one variant (one repository); return its path."""
    entry = {"name": f"{kind}-{method}", "type": kind, "passphrase_file": str(bench.passfile)}
    entry["path" if kind == "borg" else "url"] = str(repo)
    config = {"state_dir": str(bench.state_dir), "quiesce": quiesce, "libvirt_uri": bench.args.uri,
              "plugins": ["bench.rss_probe", "bench.timing_probe"], "repositories": [entry]}
    config["method"] = method
    if method != "snapshot":
        config.update({"segment_size": size_text(segment_mib), "scratch_dir": str(bench.scratch_dir)})
    path.write_text(json.dumps(config, indent=1))
    return path


def kvm_borg(bench: Bench, config: Path, *args: str, env: dict | None = None) -> dict:
    """Run `kvm-borg --config CONFIG ARGS --json`; return {seconds, rss_kib, peaks_kib, json (parsed stdout)}."""
    rss_file, timing_file = bench.workdir / "rss", bench.workdir / "timing.jsonl"
    rss_file.unlink(missing_ok=True)
    timing_file.unlink(missing_ok=True)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        spawned = time.time()
        measured = run_measured([KVM_BORG, "--config", str(config), "-q", *args, "--json"],
                                {**bench.env, RSS_ENV: str(rss_file), TIMING_ENV: str(timing_file), **(env or {})},
                                out, err, marker=str(bench.workdir))
        exited = time.time()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    # kvm-borg's own peak: its ru_maxrss as the probe plugin wrote it at the end of a backup, else the
    # largest VmHWM the sampler saw
    own = int(rss_file.read_text()) if rss_file.exists() else 0
    own = max(own, measured.peaks_kib.pop("self", 0))
    try:
        parsed = json.loads(stdout)
    except ValueError:
        raise RuntimeError(f"kvm-borg {' '.join(args)} exited {measured.returncode}: {stderr[-2000:]}") from None
    marks = [json.loads(line) for line in timing_file.read_text().splitlines()] if timing_file.exists() else []
    return {"seconds": measured.seconds, "rss_kib": own, "peaks_kib": measured.peaks_kib,
            "stretches": stretches(marks, spawned, exited),
            "json": parsed, "returncode": measured.returncode, "stderr": stderr[-2000:]}


def stretches(marks: list[dict], spawned: float, exited: float) -> dict:
    """Given bench.timing_probe's marks ({"hook", "t"}) of one backup and the spawn and exit times, return
    seconds per stretch: start (to before_snapshot), freeze (to after_snapshot: snapshot or backup job,
    bitmap, view), store (to the last after_store), release (to after_commit: merge back, or view stop,
    job end, fold, checkpoint deletion), end (to the exit); {} without marks."""
    first = {}
    for mark in marks:
        first.setdefault(mark["hook"], mark["t"])
    last_store = max((m["t"] for m in marks if m["hook"] == "after_store"), default=None)
    points = [spawned, first.get("before_snapshot"), first.get("after_snapshot"), last_store,
              first.get("after_commit"), exited]
    if any(p is None for p in points):
        return {}
    return {name: b - a for name, a, b in zip(("start", "freeze", "store", "release", "end"), points, points[1:])}


class Variant:
    """One method into one repository type, with its current repository."""

    def __init__(self, bench: Bench, method: str, kind: str, segment_mib: float):
        self.bench, self.method, self.kind, self.segment_mib = bench, method, kind, segment_mib
        self.label = f"{kind}-{method}"
        self.repo: Path | None = None
        self.config: Path | None = None

    def fresh(self, tag: str) -> None:
        """Start over with a new empty repository (the previous one is removed)."""
        self.drop()
        self.repo = init_repo(self.bench, self.kind, self.bench.workdir / f"repo-{self.label}-{tag}")
        self.config = write_config(self.bench, self.bench.workdir / f"config-{self.label}-{tag}.json", self.method,
                                   self.kind, self.repo, self.segment_mib)

    def drop(self) -> None:
        if self.repo is not None:
            shutil.rmtree(self.repo, ignore_errors=True)
            self.config.unlink(missing_ok=True)
            self.repo = self.config = None

    def backup(self) -> dict:
        """One measured backup (cold): the run's figures."""
        before = repo_size(self.bench, self.kind, self.repo)
        drop_caches(self.bench)
        out = kvm_borg(self.bench, self.config, "backup", self.bench.name)
        try:
            [result] = out["json"]["domains"]
        except (KeyError, ValueError):
            raise RuntimeError(f"kvm-borg backup: unexpected output {out['json']!r}: {out['stderr']}") from None
        if not result.get("ok"):
            raise RuntimeError(f"kvm-borg backup ({self.label}) failed: {result.get('error')}: {out['stderr']}")
        growth = repo_size(self.bench, self.kind, self.repo) - before
        disks = result.get("disks") or []
        read = sum(d.get("bytes_read") or 0 for d in disks) if disks else None
        if read is None and self.method == "snapshot":
            read = self.bench.image.stat().st_size  # borg/restic read the whole frozen image file
        return {"variant": self.label, "method": self.method, "backend": self.kind,
                "reported_method": result.get("method", "snapshot"), "seconds": out["seconds"],
                "rss_kib": out["rss_kib"], "peaks_kib": out["peaks_kib"], "stretches": out["stretches"],
                "growth": growth, "bytes_read": read,
                "disks": disks, "image_bytes": self.bench.image.stat().st_size,
                "segment_size": int(self.segment_mib * MiB) if self.method == "bitmap" else None,
                "warnings": result.get("warnings", [])}


# --- the writers ---------------------------------------------------------------------------------


def change_extents(case: str, disk_bytes: int, percent: float, seed: int) -> tuple[list[tuple[int, int]], int]:
    """Given a change case, the disk size, the percent and a seed, return (extents, unit) to write."""
    unit = 4 * MiB if case == "extents-4m" else 64 * KiB
    units = disk_bytes // unit
    fraction = max(percent / 100, 1 / units)  # at least one unit, also on a tiny disk
    return scattered_extents(disk_bytes, fraction, unit, seed), unit


def write_change(bench: Bench, case: str, seed: int) -> dict:
    """Rewrite `--change-percent` of the disk for `case` with new random data (one pattern file per write,
    so nothing written deduplicates), through the running VM; return {written, extents, seconds}."""
    extents, unit = change_extents(case, bench.disk_bytes, bench.args.change_percent, seed)
    pieces = sum(length // unit for _offset, length in extents)
    directory = bench.workdir / "patterns"
    patterns = make_patterns(directory, pieces, unit, seed=100000 + seed * 7 + bench.next_id())
    started = time.perf_counter()
    try:
        write_extents(bench.dom(), extents, patterns, piece=unit)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    written = sum(length for _offset, length in extents)
    return {"written": written, "extents": len(extents), "writes": pieces, "seconds": time.perf_counter() - started}


# --- the phases ----------------------------------------------------------------------------------


def _log(row: dict, prefix: str) -> None:
    peaks = row.get("peaks_kib", {})
    print(f"{prefix} {row['variant']:<16} {row['seconds']:7.2f}s read {(row['bytes_read'] or 0) / MiB:8.1f} MiB "
          f"+{row['growth'] / MiB:8.2f} MiB kvm-borg {row['rss_kib'] / 1024:5.0f} MiB "
          + " ".join(f"{k} {v / 1024:.0f} MiB" for k, v in sorted(peaks.items())), flush=True)


def phase_series(bench: Bench, variants: list[Variant], results: dict) -> None:
    rows = results["series"] = []
    writes = results["writes"] = []
    step = 0
    for rnd in range(bench.args.rounds):
        for variant in variants:
            variant.fresh(f"r{rnd}")
        for case_index, case in enumerate(CASES):
            change = {"written": 0, "extents": 0, "writes": 0, "seconds": 0.0}
            if case in ("extents-4m", "blocks-64k"):
                change = write_change(bench, case, seed=SWEEP_SEED if (rnd, case) == (0, "blocks-64k")
                                      else rnd * 10 + case_index)
                writes.append({"round": rnd, "case": case, **change})
                print(f"round {rnd + 1} {case}: wrote {change['written'] / MiB:.1f} MiB in {change['writes']} writes "
                      f"({change['seconds']:.1f}s)", flush=True)
            order = variants if step % 2 == 0 else variants[::-1]
            step += 1
            for variant in order:
                row = variant.backup()
                row.update({"round": rnd, "case": case, "written": change["written"]})
                rows.append(row)
                _log(row, f"round {rnd + 1} {case:<10}")
    for variant in variants:
        variant.drop()


SWEEP_SEED = 3  # the series' first round writes its 64 KiB blocks with this seed too: the same blocks


def phase_sweep(bench: Bench, results: dict) -> None:
    """For each segment size of --sweep-mib: fresh repositories, a full backup, then the worst case. A size
    equal to the series' is left out when the series ran the bitmap method (its first round's worst
    case wrote the same blocks after a full backup: the report takes those runs)."""
    sizes = [float(x) for x in bench.args.sweep_mib.split(",") if x.strip()]
    if any(r["method"] == "bitmap" for r in results.get("series", [])):
        sizes = [mib for mib in sizes if mib != bench.args.segment_mib]
    kinds = [k for k in (bench.args.sweep_backends or bench.args.backends).split(",") if k]
    rows = results["sweep"] = []
    for n, mib in enumerate(sizes):
        variants = [Variant(bench, "bitmap", kind, mib) for kind in kinds]
        for variant in variants:
            variant.fresh(f"sweep{n}")
        try:
            for variant in variants:  # the first run at this size: a new chain, every segment read
                row = variant.backup()
                row.update({"case": "full", "segment_mib": mib})
                rows.append(row)
                _log(row, f"sweep {mib:g} MiB full      ")
            change = write_change(bench, "blocks-64k", seed=SWEEP_SEED)  # the same blocks for every size
            for variant in (variants if n % 2 == 0 else variants[::-1]):
                row = variant.backup()
                row.update({"case": "blocks-64k", "segment_mib": mib, "written": change["written"]})
                rows.append(row)
                _log(row, f"sweep {mib:g} MiB blocks-64k")
        finally:
            for variant in variants:
                variant.drop()


def _nbd_socket(dom) -> tuple[str, str]:
    """The running backup job's NBD unix socket and the export name of vda."""
    xml = ET.fromstring(dom.backupGetXMLDesc(0))
    server = xml.find("server")
    export = "vda"
    for disk in xml.iter("disk"):
        if disk.get("name") == "vda" and disk.get("exportname"):
            export = disk.get("exportname")
    return server.get("socket"), export


def phase_view(bench: Bench, results: dict) -> None:
    """`kvm-borg freeze --expose` (bitmap), then `cat` of the view's segment files vs `nbdcopy` of the export."""
    variant = Variant(bench, "bitmap", "borg", bench.args.segment_mib)
    variant.fresh("view")
    expose = bench.workdir / "expose"
    res = results["view"] = {}
    try:
        out = kvm_borg(bench, variant.config, "freeze", bench.name, "--expose", str(expose))
        outcomes = out["json"] if isinstance(out["json"], list) else out["json"].get("domains", [])
        if not outcomes or not outcomes[0].get("ok"):
            raise RuntimeError(f"freeze --expose failed: {out['json']!r}: {out['stderr']}")
        disk_dir = expose / bench.name / "disks" / "vda"
        if not disk_dir.is_dir():
            raise RuntimeError(f"freeze --expose made no segment directory {disk_dir}: "
                               f"{sorted(p.name for p in (expose / bench.name / 'disks').iterdir())}")
        files = sorted(p for p in disk_dir.iterdir() if p.name != "manifest.json")
        nonzero = sum(p.stat().st_size for p in files)
        socket, export = _nbd_socket(bench.dom())
        uri = f"nbd+unix:///{export}?socket={socket}"
        for n in range(2):
            for how in (("view", "nbdcopy") if n % 2 == 0 else ("nbdcopy", "view")):
                drop_caches(bench)
                started = time.perf_counter()
                if how == "view":
                    with open(os.devnull, "wb") as sink:
                        subprocess.run(["cat", *map(str, files)], stdout=sink, check=True)
                else:
                    run("nbdcopy", uri, "null:", ok=(0,))
                seconds = time.perf_counter() - started
                res.setdefault(how, []).append(seconds)
                print(f"view {how:<8} {seconds:6.2f}s ({nonzero / MiB / seconds:6.0f} MiB/s of non-zero segments)",
                      flush=True)
        res.update({"nonzero_bytes": nonzero, "segments": len(files), "disk_bytes": bench.disk_bytes})
    finally:
        try:
            kvm_borg(bench, variant.config, "thaw", "--expose", str(expose))
        finally:
            variant.drop()


# --- the guest -----------------------------------------------------------------------------------


def phase_guest(args, results: dict, methods: list[str]) -> None:
    """The real test guest: stall and throughput while a backup runs vs idle, per method."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from guest import build  # noqa: PLC0415
    from bench.guest_impact import ConsoleWatcher  # noqa: PLC0415

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(args.uri)
    name = f"{args.name}-guest"
    artifacts = build.build_guest_artifacts()
    if args.guest_pvh:
        from guest.pvh import pvh_artifacts  # noqa: PLC0415

        artifacts = pvh_artifacts(artifacts)
    workdir = build.make_scratch_dir("bench-incr-guest-")
    build.remove_guest(conn, name)
    runs = results["guest"] = []
    try:
        guest = build.start_guest(conn, name, artifacts, workdir, "qcow2", args.guest_disk_mib,
                                  interval_ms=args.guest_interval_ms)
        build.wait_for_agent(guest.dom, timeout=args.guest_boot_timeout)
        build.wait_for_progress(guest.console_log, 50, timeout=args.guest_boot_timeout)
        watcher = ConsoleWatcher(guest.console_log)
        watcher.start()
        gbench = argparse.Namespace(uri=args.uri)
        state = workdir / "state"
        scratch = workdir / "scratch"
        scratch.mkdir()
        os.chmod(scratch, 0o1777)
        passfile = workdir / "passphrase"
        passfile.write_text(PASSPHRASE)
        os.chmod(passfile, 0o600)
        env = {**os.environ, "BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(workdir / "borg-base")}
        configs = {}
        for method in methods:
            repo = workdir / f"repo-{method}"
            run(BORG, "init", "--encryption", "repokey-blake2", repo, env=env, ok=(0,))
            config = {"state_dir": str(state), "quiesce": args.guest_quiesce, "libvirt_uri": gbench.uri, "plugins": [],
                      "repositories": [{"name": method, "type": "borg", "path": str(repo),
                                        "passphrase_file": str(passfile)}]}
            config["method"] = method
            if method != "snapshot":
                config.update({"segment_size": size_text(args.segment_mib),
                               "scratch_dir": str(scratch)})
            configs[method] = workdir / f"config-{method}.json"
            configs[method].write_text(json.dumps(config))
        try:
            for n in range(args.guest_runs + 1):  # run 0 of each method is its first (full) backup
                for method in (methods if n % 2 == 0 else methods[::-1]):
                    row = _guest_backup(build, watcher, guest, configs[method], env, method, args.guest_idle_s)
                    row["run"] = n
                    runs.append(row)
                    print(f"guest run {n} {method:<8} backup {row['seconds']:.2f}s stall {row['stall_ms']:.0f} ms "
                          f"(idle {row['idle_stall_ms']:.0f} ms), {row['records_per_s']:.0f} records/s "
                          f"(idle {row['idle_records_per_s']:.0f})", flush=True)
        finally:
            watcher.stop.set()
        results["guest_meta"] = {"kernel": artifacts.manifest.get("kernel_version"), "interval_ms": args.guest_interval_ms,
                                 "disk_mib": args.guest_disk_mib, "quiesce": args.guest_quiesce}
    finally:
        cleanup = libvirt.open(args.uri)
        try:
            try:
                dom = cleanup.lookupByName(name)
                for checkpoint in dom.listAllCheckpoints():
                    checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError:
                pass
            build.remove_guest(cleanup, name)
            remove_domain(cleanup, name)
        finally:
            cleanup.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _window(seq_times, start_us: float, end_us: float) -> tuple[float, float]:
    """(longest gap between consecutive durable records overlapping the window in ms, records/s in it)."""
    gap = 0
    for (s1, t1), (s2, t2) in zip(seq_times, seq_times[1:]):
        if s2 > s1 and t2 >= start_us and t1 <= end_us:
            gap = max(gap, t2 - t1)
    inside = sum(1 for _s, t in seq_times if start_us <= t <= end_us)
    return gap / 1000, inside / ((end_us - start_us) / 1e6)


def _guest_backup(build, watcher, guest, config: Path, env: dict, method: str, idle_s: float) -> dict:
    idle_start = time.monotonic()
    time.sleep(idle_s)
    started = time.monotonic()
    proc = subprocess.run([KVM_BORG, "--config", str(config), "-q", "backup", guest.name, "--json"], env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    ended = time.monotonic()
    try:
        [result] = json.loads(proc.stdout)["domains"]
    except (ValueError, KeyError):
        raise RuntimeError(f"kvm-borg backup exited {proc.returncode}: {proc.stderr[-2000:]}") from None
    if not result["ok"]:
        raise RuntimeError(f"guest backup ({method}) failed: {result.get('error')}: {proc.stderr[-2000:]}")
    time.sleep(0.5)  # the console catches up
    offset = watcher.offset(idle_start)
    seq_times = build.serial_seq_times(guest.console_log)
    errors = build.serial_errors(guest.console_log)
    if errors:
        raise RuntimeError(f"guest I/O errors: {errors}")

    def us(host_t: float) -> float:
        return (host_t - offset) * 1e6

    length = ended - started
    stall, rate = _window(seq_times, us(started), us(ended))
    idle_from = max(idle_start, started - length)
    idle_stall, idle_rate = _window(seq_times, us(idle_from), us(started))
    return {"method": method, "reported_method": result.get("method", "snapshot"), "seconds": length,
            "stall_ms": stall, "records_per_s": rate, "idle_stall_ms": idle_stall, "idle_records_per_s": idle_rate,
            "consistency": result.get("consistency")}


# --- the run -------------------------------------------------------------------------------------


def run_all(args, argv) -> dict:
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"--phases: unknown phase(s) {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    if not methods or set(methods) - {"snapshot", "bitmap"} or not kinds or set(kinds) - {"borg", "restic"}:
        raise SystemExit("--methods: snapshot,bitmap; --backends: borg,restic")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(args.uri)
    results: dict = {"errors": {}, "command": "python -m bench incremental " + " ".join(argv),
                     "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "methods": methods,
                     "backends": kinds, "segment_mib": args.segment_mib, "change_percent": args.change_percent,
                     "machine": machine_description(conn),
                     "restic": " ".join(run(RESTIC, "version").stdout.split()[:2]),
                     "kvm_borg": run(KVM_BORG, "--version", ok=(0, 1, 2)).stdout.strip(),
                     "load_before": os.getloadavg()}
    started = time.monotonic()
    dataset = ds.build_dataset(args.cache_dir, args.data_mib, args.disk_mib)
    results["dataset"] = {"data": dataset.data_bytes, "real": dataset.real_bytes, "disk": dataset.disk_bytes,
                          "image": dataset.image_bytes}
    print(f"dataset: {dataset.data_bytes / MiB:.0f} MiB of files ({dataset.real_bytes / MiB:.0f} MiB real) on a "
          f"{dataset.disk_bytes / MiB:.0f} MiB disk, {dataset.image_bytes / MiB:.0f} MiB qcow2", flush=True)
    remove_bench_domain(args.uri, args.name)
    workdir = prepare_workdir(args.workdir)
    stopped = False
    try:
        domain_phases = [p for p in phases if p in ("series", "sweep", "view")]
        if domain_phases:
            image = ds.working_copy(dataset, workdir / "disk.qcow2")
            define_domain(conn, args.name, image)
            bench = Bench(args, conn, workdir, image, dataset.disk_bytes)
            variants = [Variant(bench, method, kind, args.segment_mib) for method in methods for kind in kinds]
            for phase in domain_phases:
                if phase != "series" and "bitmap" not in methods:
                    continue
                fn = {"series": lambda: phase_series(bench, variants, results),
                      "sweep": lambda: phase_sweep(bench, results),
                      "view": lambda: phase_view(bench, results)}[phase]
                try:
                    fn()
                except Stop as exc:  # keep the figures so far, clean up, write the report
                    results["errors"][phase] = f"stopped by {exc}: the runs finished before are kept"
                    stopped = True
                    break
                except Exception as exc:  # record, go on with the next phase
                    traceback.print_exc()
                    results["errors"][phase] = f"{type(exc).__name__}: {exc}"[:3000]
                finally:
                    for variant in variants:
                        variant.drop()
            remove_bench_domain(args.uri, args.name)
        if "guest" in phases and not stopped:
            try:
                phase_guest(args, results, methods)
            except Stop as exc:
                results["errors"]["guest"] = f"stopped by {exc}: the runs finished before are kept"
            except Exception as exc:
                traceback.print_exc()
                results["errors"]["guest"] = f"{type(exc).__name__}: {exc}"[:3000]
    finally:
        remove_bench_domain(args.uri, args.name)
        remove_workdir(workdir)
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
    results["seconds"] = time.monotonic() - started
    results["load_after"] = os.getloadavg()
    return results


def merge_results(parts: list[dict]) -> dict:
    """Given the results of several invocations, return one: the first's header, every run of every phase,
    every error; the command and start of each are kept in `merged_from` (the report says they were not paired)."""
    if len(parts) == 1:
        return parts[0]
    merged = {**parts[0], "errors": {}, "merged_from": [f"{p.get('started')}: {p.get('command')}" for p in parts]}
    for key in ("series", "writes", "sweep", "guest"):
        merged[key] = [row for p in parts for row in p.get(key, [])]
    for p in parts:
        merged["errors"].update(p.get("errors", {}))
        for key in ("view", "guest_meta"):
            if p.get(key):
                merged[key] = p[key]
        for key in ("methods", "backends"):
            merged[key] = list(dict.fromkeys(merged.get(key, []) + p.get(key, [])))
    merged["seconds"] = sum(p.get("seconds", 0) for p in parts)
    return merged


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from bench import incremental_report as report  # noqa: PLC0415

    if args.render_only:
        sources = str(args.render_only).split(",")
        results = merge_results([json.loads(Path(p).read_text()) for p in sources])
        if len(sources) > 1:  # the merged figures are the report's source from now on
            args.out_dir.mkdir(parents=True, exist_ok=True)
            (args.out_dir / "incremental.json").write_text(json.dumps(results, indent=1) + "\n")
    else:
        if os.geteuid() != 0:
            raise SystemExit("run me as root (libvirt qemu:///system, drop_caches, images QEMU can open)")
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _on_signal)
        results = run_all(args, argv)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "incremental.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report.render(results)
    (args.out_dir / "incremental.md").write_text(text)
    print(text)
    return 2 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

