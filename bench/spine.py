"""kvm-borg backup vs the plain shell sequence on the same running domain, paired runs.

    /opt/kvm-borg/venv/bin/python -m bench.spine [--runs 5] [--data-mib 1024] [--disk-mib 4096]

Plain sequence = `virsh snapshot-create-as --disk-only --atomic --no-metadata`, `borg create` of
the frozen image with kvm-borg's options (lz4, fixed,4194304, no --sparse), `virsh blockcommit
--active --pivot --wait`, `rm overlay` (bench/variants.py). Each run writes into a fresh
repository (a full backup), variants alternate order (ABBA) so drift hits both. Writes
docs/performance/spine.md. The whole suite (`python -m bench`) measures this case too, beside
restic, virtnbdbackup, repeat runs and restores.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import libvirt

from bench import variants as v
from bench.common import build_reference_domain, evict_cache, machine_description, median, prepare_workdir, \
    remove_domain, remove_workdir, timed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-mib", type=int, default=1024, help="real files on the disk's file system")
    parser.add_argument("--disk-mib", type=int, default=4096, help="virtual disk size")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/kvm-borg-bench-spine"))
    parser.add_argument("--out", type=Path, default=Path("docs/performance/spine.md"))
    args = parser.parse_args(argv)

    conn = libvirt.open("qemu:///system")
    name = "kvm-borg-bench-spine"
    remove_domain(conn, name)
    workdir = prepare_workdir(args.workdir)
    try:
        domain = build_reference_domain(conn, workdir / "ref", name, args.data_mib, args.disk_mib)
        image_bytes = domain.disk.stat().st_size
        bench = v.Bench(domain, workdir)
        runs = paired_runs(bench, args.runs, lambda repo: {"seconds": timed(
            lambda: v.kvm_borg_backup(bench, v.kvm_borg_config(bench, repo, "borg")))})
        times = {variant: [r["seconds"] for r in rows] for variant, rows in runs.items()}
        description = machine_description(conn)
    finally:
        remove_domain(conn, name)
        remove_workdir(workdir)
    ratios = [k / p for k, p in zip(times["kvm-borg"], times["plain"])]
    report = render(args, description, image_bytes, domain.data_bytes, times, ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0 if median(times["kvm-borg"]) <= 1.10 * median(times["plain"]) else 1


def paired_runs(bench: v.Bench, runs: int, kvm_borg_backup, cold: bool = True) -> dict[str, list[dict]]:
    """Given a Bench, a number of runs and `kvm_borg_backup(repo) -> {"seconds": ..., ...}` (one kvm-borg
    backup into the fresh borg repository `repo`), back up the domain `runs` times with the
    plain sequence and with kvm-borg, alternating order (ABBA), each into a fresh repository, the image
    dropped from the page cache first when `cold`; return {"plain": [...], "kvm-borg": [...]}, one dict
    with at least "seconds" per run."""
    results = {"plain": [], "kvm-borg": []}
    for n in range(runs):
        for variant in ("plain", "kvm-borg") if n % 2 == 0 else ("kvm-borg", "plain"):
            repo = v.init_borg(bench, bench.workdir / f"repo-{variant}-{n}")
            if cold:  # as in the suite: borg drops what it reads from the cache
                evict_cache(bench.domain.disk)
            try:
                if variant == "plain":
                    out = {"seconds": timed(lambda: v.plain_borg(bench, repo))}
                else:
                    out = kvm_borg_backup(repo)
            finally:
                shutil.rmtree(repo, ignore_errors=True)
                repo.with_name(repo.name + ".config.yaml").unlink(missing_ok=True)
            results[variant].append(out)
            print(f"run {n + 1}/{runs} {variant:<9} {out['seconds']:7.2f}s", flush=True)
    return results


def render(args, description, image_bytes, data_bytes, times, ratios) -> str:
    rows = "\n".join(
        f"| {n + 1} | {p:.2f} | {k:.2f} | {r:.3f} |"
        for n, (p, k, r) in enumerate(zip(times["plain"], times["kvm-borg"], ratios))
    )
    ratio_of_medians = median(times["kvm-borg"]) / median(times["plain"])
    verdict = "met" if ratio_of_medians <= 1.10 else "MISSED"
    return f"""# Spine benchmark: kvm-borg backup vs the plain sequence

Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by
`python -m bench.spine --runs {args.runs} --data-mib {args.data_mib} --disk-mib {args.disk_mib}`.

Machine: {description}.

Reference domain: running, one qcow2 disk ({args.disk_mib} MiB virtual, {image_bytes / 2**20:.0f} MiB image file)
holding an ext4 file system with {data_bytes / 2**20:.0f} MiB of real files copied from /usr.
Each run is a full backup into a fresh encrypted (repokey-blake2) borg repository with lz4 and
`fixed,4194304` chunks, reading the image cold (dropped from the page cache before each run); the
two variants alternate order.

| run | plain sequence (s) | kvm-borg backup (s) | ratio |
|---:|---:|---:|---:|
{rows}
| **median** | **{median(times['plain']):.2f}** | **{median(times['kvm-borg']):.2f}** | **{median(ratios):.3f}** |

Target: kvm-borg's median ≤ 1.10 × the plain sequence's median — **{verdict}** (ratio of the
medians {ratio_of_medians:.3f}; median of the paired ratios {median(ratios):.3f}).
The whole suite, with restic, virtnbdbackup, repeat runs and restores: [suite.md](suite.md).
"""


if __name__ == "__main__":
    raise SystemExit(main())
