"""The benchmark suite: kvm-borg against the plain sequences and virtnbdbackup, side by side in one run.

    sudo /opt/kvm-borg/venv/bin/python -m bench [--runs 5] [--data-mib 1024] [--disk-mib 4096] ...

Builds a running reference domain whose qcow2 disk holds an ext4 file system of real files
copied from /usr, then measures, each case several times in alternating order:

  full      full backups, each into a fresh repository: the read limit (`cat`), the plain borg
            and restic sequences, kvm-borg into borg and into restic, virtnbdbackup -l copy [-z];
  repeat    repeat backups into kept repositories after changing 0 %, 1 %, 10 % of the disk's
            blocks (HMP qemu-io writes of random data): time and bytes added, for kvm-borg
            (borg with fixed,4194304 and with borg's default buzhash chunker; restic) and the
            plain borg and restic sequences;
  restore   `kvm-borg restore --disk vda --to FILE` against `borg extract --sparse` of the same
            archive: throughput and allocated size;
  commit    blockcommit time against the MiB the guest wrote while the backup ran;
  guest     the real test guest (tests/guest): longest write stall during snapshot and commit
            (bench/guest_impact.py);
  fixed-cost  kvm-borg's own fixed cost per backup and its paired overhead against the plain
            sequence, on a small domain of its own (bench/fixed_cost.py, also runnable alone:
            `python -m bench fixed-cost`).

Writes docs/performance/suite.md, suite.json, fixed-cost.md and the PNG plots; removes every domain, overlay and
repository it made, also on failure or SIGTERM. `--render-only suite.json` redraws the report
from saved figures. Not part of the test suite (tests/test_bench_smoke.py runs it at tiny sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import libvirt

from bench import fixed_cost
from bench import variants as v
from bench.common import (
    BORG,
    KVM_BORG,
    MiB,
    KiB,
    allocated_bytes,
    build_reference_domain,
    evict_cache,
    machine_description,
    make_patterns,
    prepare_workdir,
    remove_domain,
    remove_workdir,
    run,
    scattered_extents,
    tree_bytes,
    write_extents,
)

PHASES = ("full", "repeat", "restore", "commit", "guest", "fixed-cost")
REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--data-mib", type=int, default=1024, help="real files on the reference disk's ext4 (MiB)")
    p.add_argument("--disk-mib", type=int, default=4096, help="virtual size of the reference disk (MiB)")
    p.add_argument("--format", default="qcow2", choices=["qcow2", "raw"], help="reference disk format")
    p.add_argument("--runs", type=int, default=5, help="full backups per variant")
    p.add_argument("--repeat-rounds", type=int, default=3, help="rounds of (0 %%, 1 %%, 10 %%) changes")
    p.add_argument("--levels", default="0,1,10", help="changed percent of the disk's blocks per repeat step")
    p.add_argument("--change-unit-kib", type=int, default=64, help="size of one changed block (KiB)")
    p.add_argument("--restore-runs", type=int, default=5, help="restores per variant")
    p.add_argument("--commit-write-mib", default="0,128,512", help="MiB written while the backup runs")
    p.add_argument("--commit-runs", type=int, default=2, help="backups per amount written")
    p.add_argument("--guest-runs", type=int, default=3, help="backups of the real guest per quiesce mode")
    p.add_argument("--guest-modes", default="auto,off", help="quiesce modes for the guest phase")
    p.add_argument("--guest-idle-s", type=float, default=2.0,
                   help="idle window before each guest backup, the reference its stall is compared with (s)")
    p.add_argument("--fixed-runs", type=int, default=7, help="paired rounds of the fixed-cost case")
    p.add_argument("--fixed-data-mib", type=int, default=16, help="real files on the fixed-cost case's small disk (MiB)")
    p.add_argument("--fixed-disk-mib", type=int, default=128, help="virtual size of that small disk (MiB)")
    p.add_argument("--skip", default="", help=f"comma-separated phases to leave out ({','.join(PHASES)})")
    p.add_argument("--no-virtnbdbackup", action="store_true", help="leave virtnbdbackup out")
    p.add_argument("--no-plots", action="store_true", help="markdown only (no matplotlib needed)")
    p.add_argument("--name", default="kvm-borg-bench-ref", help="reference domain name")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/kvm-borg-bench"),
                   help="scratch directory (images, overlays, repositories); removed afterwards")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs/performance", help="where the report goes")
    p.add_argument("--uri", default="qemu:///system")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--render-only", type=Path, metavar="JSON", help="only redraw the report from a suite.json")
    return p.parse_args(argv)


def command_line(argv) -> str:
    return "python -m bench" + ("" if not argv else " " + shlex.join(argv))


class Stop(Exception):
    """SIGTERM/SIGHUP: unwind so that every `finally` cleans up."""


def _on_signal(signum, _frame):
    raise Stop(signal.Signals(signum).name)


# --- the phases ----------------------------------------------------------------------------------


FULL_VARIANTS = ("read", "borg-plain", "borg-kvm", "restic-plain", "restic-kvm", "nbd-copy", "nbd-copy-z")
REPEAT_VARIANTS = ("borg-kvm", "borg-kvm-buzhash", "borg-plain", "restic-kvm", "restic-plain")


def full_backup_once(bench: v.Bench, variant: str, repo: Path) -> dict:
    """One full backup of `variant` into the fresh location `repo` (removed afterwards), image read cold."""
    try:
        evict_cache(bench.domain.disk)
        if variant == "read":
            return v.measure(v.read_image, bench)
        if variant == "borg-plain":
            v.init_borg(bench, repo)
            out = v.measure(v.plain_borg, bench, repo)
        elif variant == "borg-kvm":
            v.init_borg(bench, repo)
            out = v.measure(v.kvm_borg_backup, bench, v.kvm_borg_config(bench, repo, "borg"))
        elif variant == "restic-plain":
            v.init_restic(bench, repo)
            out = v.measure(v.plain_restic, bench, repo)
        elif variant == "restic-kvm":
            v.init_restic(bench, repo)
            out = v.measure(v.kvm_borg_backup, bench, v.kvm_borg_config(bench, repo, "restic"))
        elif variant in ("nbd-copy", "nbd-copy-z"):
            out = v.measure(v.virtnbdbackup, bench, repo, variant == "nbd-copy-z")
        else:
            raise ValueError(variant)
        out["stored"] = tree_bytes(repo)
        result = out.pop("result", None) or {}
        if "commit_seconds" in result:  # kvm-borg's own account of its steps
            out["steps"] = {"snapshot_s": result["freeze_seconds"], "store_s": result["stores"][0]["seconds"],
                            "commit_s": result["commit_seconds"]}
        elif "store_s" in result:
            out["steps"] = result
        return out
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        for config in repo.parent.glob(repo.name + ".config.yaml"):
            config.unlink()


def phase_full(bench: v.Bench, args, results: dict) -> None:
    chosen = [x for x in FULL_VARIANTS if not (x.startswith("nbd") and results["nbd_unavailable"])]
    full = results["full"] = {x: [] for x in chosen}
    for n in range(args.runs):
        order = chosen if n % 2 == 0 else chosen[::-1]
        for variant in order:
            if variant not in full:
                continue
            try:
                out = full_backup_once(bench, variant, bench.workdir / f"full-{variant}-{n}")
            except Stop:
                raise
            except Exception as exc:  # this variant is left out from here on; the others go on
                traceback.print_exc()
                results["errors"][f"full: {variant}"] = f"{type(exc).__name__}: {exc}"[:1500]
                del full[variant]
                continue
            full[variant].append(out)
            print(f"full {n + 1}/{args.runs} {variant:<13} {out['seconds']:7.2f}s", flush=True)


def _repeat_backup(bench: v.Bench, variant: str, repo: Path, configs: dict) -> dict:
    evict_cache(bench.domain.disk)
    if variant == "borg-plain":
        return v.measure(v.plain_borg, bench, repo, size_of=repo)
    if variant == "restic-plain":
        return v.measure(v.plain_restic, bench, repo, size_of=repo)
    out = v.measure(v.kvm_borg_backup, bench, configs[variant], size_of=repo)
    [store] = out.pop("result")["stores"]
    out["dedup"] = store.get("deduplicated_size")
    out["archive"] = store.get("archive")
    return out


def phase_repeat(bench: v.Bench, args, results: dict, conn) -> None:
    levels = [float(x) for x in args.levels.split(",") if x.strip()]
    unit = args.change_unit_kib * KiB
    repos, configs = {}, {}
    for variant in REPEAT_VARIANTS:
        repo = repos[variant] = bench.workdir / f"repeat-{variant}"
        (v.init_restic if variant.startswith("restic") else v.init_borg)(bench, repo)
        if variant.endswith("kvm") or variant.endswith("buzhash"):
            kind = "restic" if variant.startswith("restic") else "borg"
            chunker = v.BORG_DEFAULT_CHUNKER if variant.endswith("buzhash") else None
            configs[variant] = v.kvm_borg_config(bench, repo, kind, chunker=chunker)
    rep = results["repeat"] = {"initial": {}, "steps": [], "unit": unit}
    for variant in REPEAT_VARIANTS:
        rep["initial"][variant] = _repeat_backup(bench, variant, repos[variant], configs)
        print(f"repeat initial {variant:<17} {rep['initial'][variant]['seconds']:7.2f}s "
              f"+{rep['initial'][variant]['added'] / MiB:9.1f} MiB", flush=True)
    dom = conn.lookupByName(bench.domain.name)
    step = 0
    for rnd in range(args.repeat_rounds):
        for level in levels:
            step += 1
            extents = scattered_extents(bench.domain.disk_bytes, level / 100, unit, seed=step)
            written = sum(length for _offset, length in extents)
            write_s = 0.0
            if extents:
                # One pattern file per write, so no two written blocks share their bytes.
                patterns = make_patterns(bench.workdir / "patterns", 256, unit, seed=1000 + step)
                started = time.perf_counter()
                write_extents(dom, extents, patterns, piece=unit)
                write_s = time.perf_counter() - started
                shutil.rmtree(bench.workdir / "patterns")
            entry = {"round": rnd + 1, "level": level, "written": written, "write_seconds": write_s,
                     "extents": len(extents), "image": bench.domain.disk.stat().st_size, "results": {}}
            order = list(REPEAT_VARIANTS)
            shift = step % len(order)
            order = order[shift:] + order[:shift]
            if step % 2:
                order.reverse()
            for variant in order:
                out = _repeat_backup(bench, variant, repos[variant], configs)
                entry["results"][variant] = out
                print(f"repeat r{rnd + 1} {level:>4g}% {variant:<17} {out['seconds']:7.2f}s "
                      f"+{out['added'] / MiB:9.2f} MiB (writing {written / MiB:.0f} MiB took {write_s:.1f}s)",
                      flush=True)
            rep["steps"].append(entry)
    results["_repeat_repos"] = {k: str(p) for k, p in repos.items()}
    results["_repeat_configs"] = {k: str(p) for k, p in configs.items()}


def _ensure_borg_archive(bench: v.Bench, results: dict) -> tuple[Path, Path, str]:
    """The borg repository kvm-borg wrote in the repeat phase (or a new one) and its newest archive."""
    repos, configs = results.get("_repeat_repos", {}), results.get("_repeat_configs", {})
    if "borg-kvm" in repos:
        repo, config = Path(repos["borg-kvm"]), Path(configs["borg-kvm"])
    else:
        repo = v.init_borg(bench, bench.workdir / "restore-repo")
        config = v.kvm_borg_config(bench, repo, "borg")
    archive = v.kvm_borg_backup(bench, config)["stores"][0]["archive"]
    return repo, config, archive


def phase_restore(bench: v.Bench, args, results: dict) -> None:
    repo, config, archive = _ensure_borg_archive(bench, results)
    image_path = str(bench.domain.disk).lstrip("/")
    out_dir = bench.workdir / "restore"
    res = results["restore"] = {"archive": archive, "kvm-borg": [], "borg-extract": [],
                                "source_allocated": allocated_bytes(bench.domain.disk)}
    for n in range(args.restore_runs):
        for variant in (("kvm-borg", "borg-extract") if n % 2 == 0 else ("borg-extract", "kvm-borg")):
            out_dir.mkdir(exist_ok=True)
            evict_cache(repo)
            if variant == "kvm-borg":
                target = out_dir / "vda.img"
                argv = [KVM_BORG, "--config", config, "-q", "restore", bench.domain.name, "--archive", archive,
                        "--disk", "vda", "--to", target]
                seconds = v.measure(run, *argv, env=bench.env, ok=(0,))["seconds"]
            else:
                target = out_dir / image_path
                seconds = v.measure(run, BORG, "extract", "--sparse", f"{repo}::{archive}", image_path,
                                    env=bench.env, cwd=out_dir, ok=(0,))["seconds"]
            entry = {"seconds": seconds, "size": target.stat().st_size, "allocated": allocated_bytes(target)}
            if variant == "borg-extract":  # kvm-borg fsyncs what it restored; borg leaves it to the kernel
                entry["fsync_seconds"] = v.measure(run, "sync", target, ok=(0,))["seconds"]
            res[variant].append(entry)
            print(f"restore {n + 1}/{args.restore_runs} {variant:<12} {seconds:7.2f}s "
                  f"{entry['size'] / MiB / seconds:7.0f} MiB/s, allocated {entry['allocated'] / MiB:.0f} MiB",
                  flush=True)
            if n == 0:
                (out_dir / f"first-{variant}").symlink_to(target)
            else:
                target.unlink()
        if n == 0:
            a, b = (out_dir / "first-kvm-borg").resolve(), (out_dir / "first-borg-extract").resolve()
            res["identical"] = run("cmp", "-s", a, b, ok=(0, 1)).returncode == 0
        shutil.rmtree(out_dir, ignore_errors=True)


def phase_commit(bench: v.Bench, args, results: dict) -> None:
    amounts = [int(x) for x in args.commit_write_mib.split(",") if x.strip()]
    repo = v.init_borg(bench, bench.workdir / "commit-repo")
    config = v.kvm_borg_config(bench, repo, "borg", plugins=("bench.writer_plugin",))
    [pattern] = make_patterns(bench.workdir / "commit-pattern", 1, MiB, seed=7)
    log = bench.workdir / "writes.jsonl"
    rows = results["commit"] = []
    v.kvm_borg_backup(bench, config)  # the first backup reads everything; the measured ones repeat
    for n in range(args.commit_runs):
        for mib in (amounts if n % 2 == 0 else amounts[::-1]):
            mib = min(mib, bench.domain.disk_bytes // MiB)
            log.unlink(missing_ok=True)
            evict_cache(bench.domain.disk)
            env = {"KVM_BORG_BENCH_WRITE_MIB": str(mib), "KVM_BORG_BENCH_WRITE_PATTERN": str(pattern),
                   "KVM_BORG_BENCH_WRITE_OFFSET": str(bench.domain.disk_bytes - mib * MiB),
                   "KVM_BORG_BENCH_WRITE_LOG": str(log)}
            out = v.measure(v.kvm_borg_backup, bench, config, env)
            result = out["result"]
            writes = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            if mib and not writes:
                raise RuntimeError(f"the writer plugin did not write {mib} MiB (see kvm-borg's log)")
            rows.append({"mib": mib, "commit_seconds": result["commit_seconds"],
                         "write_seconds": writes[0]["seconds"] if writes else 0.0, "total_seconds": out["seconds"]})
            print(f"commit {n + 1}/{args.commit_runs} wrote {mib:5d} MiB: commit {result['commit_seconds']:.2f}s",
                  flush=True)
    shutil.rmtree(repo, ignore_errors=True)


def phase_guest(args, results: dict) -> None:
    from bench import guest_impact

    modes = [m.strip() for m in args.guest_modes.split(",") if m.strip()]
    gargs = guest_impact.parse_args(["--runs", str(args.guest_runs), "--modes", ",".join(modes),
                                     "--name", f"{args.name}-guest", "--idle-s", str(args.guest_idle_s)])
    runs, description, manifest = guest_impact.measure(gargs, modes)
    results["guest"] = {"modes": modes, "runs": [dataclasses.asdict(r) for r in runs],
                        "report": guest_impact.render(runs, modes, gargs, description, manifest)}


def phase_fixed_cost(conn, workdir: Path, args, results: dict) -> None:
    results["fixed_cost"] = fixed_cost.measure(conn, workdir / "fixed-cost", f"{args.name}-fixed", args.fixed_runs,
                                               args.fixed_data_mib, args.fixed_disk_mib, args.uri)


# --- the run -------------------------------------------------------------------------------------


def remove_reference(args) -> None:
    """Remove the reference domain through a new connection (the suite's may have died with a libvirtd restart)."""
    conn = libvirt.open(args.uri)
    try:
        remove_domain(conn, args.name)
    finally:
        conn.close()


def run_suite(args, argv) -> dict:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(PHASES)
    if unknown:
        raise SystemExit(f"--skip: unknown phase(s) {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(args.uri)
    results: dict = {"errors": {}, "command": command_line(argv), "args": {k: str(x) for k, x in vars(args).items()},
                     "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results["nbd_unavailable"] = ("left out (--no-virtnbdbackup)" if args.no_virtnbdbackup
                                  else v.virtnbdbackup_available())
    results["machine"] = machine_description(conn)
    results["versions"] = {"restic": " ".join(run(v.RESTIC, "version").stdout.split()[:2]),
                           "kvm-borg": run(KVM_BORG, "--version", ok=(0, 1, 2)).stdout.strip()}
    if not results["nbd_unavailable"]:
        results["versions"]["virtnbdbackup"] = "virtnbdbackup " + run("virtnbdbackup", "--version").stdout.strip()
    started = time.monotonic()
    remove_domain(conn, args.name)
    workdir = prepare_workdir(args.workdir)
    try:
        if {"full", "repeat", "restore", "commit"} - skip:
            domain = build_reference_domain(conn, workdir / "ref", args.name, args.data_mib, args.disk_mib,
                                            args.format)
            bench = v.Bench(domain, workdir, uri=args.uri)
            results["reference"] = {"data": domain.data_bytes, "disk": domain.disk_bytes, "format": domain.fmt,
                                    "image": domain.disk.stat().st_size, "image_allocated": allocated_bytes(domain.disk)}
            print(f"reference domain {args.name}: {domain.data_bytes / MiB:.0f} MiB of files, "
                  f"{results['reference']['image'] / MiB:.0f} MiB {domain.fmt} image", flush=True)
            for phase, fn in (("full", lambda: phase_full(bench, args, results)),
                              ("repeat", lambda: phase_repeat(bench, args, results, conn)),
                              ("restore", lambda: phase_restore(bench, args, results)),
                              ("commit", lambda: phase_commit(bench, args, results))):
                if phase in skip:
                    continue
                try:
                    fn()
                except Stop:
                    raise
                except Exception as exc:  # record, go on with the next phase
                    traceback.print_exc()
                    results["errors"][phase] = f"{type(exc).__name__}: {exc}"
            remove_reference(args)
        for phase, fn in (("guest", lambda: phase_guest(args, results)),
                          ("fixed-cost", lambda: phase_fixed_cost(conn, workdir, args, results))):
            if phase in skip:
                continue
            try:
                fn()
            except Stop:
                raise
            except Exception as exc:
                traceback.print_exc()
                results["errors"][phase] = f"{type(exc).__name__}: {exc}"
    finally:
        remove_reference(args)
        remove_workdir(workdir)
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
    results["seconds"] = time.monotonic() - started
    for key in [k for k in results if k.startswith("_")]:
        del results[key]
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from bench import report

    if args.render_only:
        results = json.loads(args.render_only.read_text())
    else:
        if os.geteuid() != 0:
            raise SystemExit("run me as root (libvirt qemu:///system, images QEMU can open)")
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _on_signal)
        results = run_suite(args, argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        (args.out_dir / "suite.json").write_text(json.dumps(results, indent=1) + "\n")
    files = report.write(results, args.out_dir, plots=not args.no_plots)
    text = (args.out_dir / "suite.md").read_text()
    print(text)
    print("wrote " + ", ".join(str(f) for f in files))
    verdicts = report.targets(results)
    if results["errors"]:
        return 2
    return 1 if args.strict and not all(t["met"] for t in verdicts if t["met"] is not None) else 0
