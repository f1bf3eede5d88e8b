"""docs/performance/incremental.md from the figures bench/incremental.py saved (incremental.json).

    render(results) -> str     targets(results) -> list[dict(name, goal, figure, met: bool|None, why)]

Pure: reads only the dict. Medians over the rounds; ratios are ratios of medians.
"""

from __future__ import annotations

import statistics
import time

MiB = 1 << 20
CASES = ("full", "unchanged", "extents-4m", "blocks-64k")
CASE_TEXT = {"full": "first full backup", "unchanged": "unchanged repeat",
             "extents-4m": "1 % rewritten, 4 MiB-aligned extents", "blocks-64k": "1 % rewritten, 64 KiB blocks at random"}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _rows(results, method, backend, case):
    return [r for r in results.get("series", []) if r["method"] == method and r["backend"] == backend
            and r["case"] == case]


def series_median(results, method, backend, case, key="seconds"):
    return _median([r.get(key) for r in _rows(results, method, backend, case)])


def sweep_rows(results, case):
    """The sweep's runs of `case`, plus the series' first-round bitmap runs of it (the sweep leaves the series'
    segment size out: that round wrote the same blocks after a full backup), sorted by segment size."""
    rows = [r for r in results.get("sweep", []) if r["case"] == case]
    sizes = {r["segment_mib"] for r in rows}
    if rows or results.get("sweep") is not None:
        rows += [{**r, "segment_mib": results.get("segment_mib")} for r in results.get("series", [])
                 if r["method"] == "bitmap" and r["case"] == case and r["round"] == 0
                 and results.get("segment_mib") not in sizes]
    return sorted(rows, key=lambda r: (r["segment_mib"], r["backend"]))


def _s(x):
    return "-" if x is None else f"{x:.2f}"


def _mib(x):
    return "-" if x is None else f"{x / MiB:.1f}"


def _ratio(a, b):
    return None if a is None or not b else a / b


def _r(x, pct=False):
    if x is None:
        return "-"
    return f"{x * 100:.1f} %" if pct else f"{x:.2f}×"


def _peak(rows, kind):
    values = [r.get("peaks_kib", {}).get(kind) for r in rows]
    values = [v for v in values if v]
    return max(values) * 1024 if values else None


def targets(results) -> list[dict]:
    out = []
    backends = results.get("backends", [])
    have_bitmap = any(r["method"] == "bitmap" for r in results.get("series", []))
    why_missing = results.get("errors", {}).get("series") or ("the bitmap method was not measured"
                                                              if not have_bitmap else None)

    def add(name, goal, figure, met, why=""):
        out.append({"name": name, "goal": goal, "figure": figure, "met": met, "why": why})

    for backend in backends:
        for case, goal, limit, against in (("full", "≤ 1.2× snapshot full", 1.2, "full"),
                                           ("unchanged", "≤ 5 % of snapshot full", 0.05, "full"),
                                           ("extents-4m", "≤ 10 % of snapshot full", 0.10, "full"),
                                           ("blocks-64k", "≤ snapshot, same case", 1.0, "blocks-64k")):
            bitmap = series_median(results, "bitmap", backend, case)
            base = series_median(results, "snapshot", backend, against)
            ratio = _ratio(bitmap, base)
            pct = against == "full" and case != "full"
            figure = (f"{_s(bitmap)} s vs {_s(base)} s = {_r(ratio, pct)}" if ratio is not None else "not measured")
            add(f"{backend}: {CASE_TEXT[case]}", goal, figure, None if ratio is None else ratio <= limit,
                "" if ratio is not None else (why_missing or ""))
        for row in [r for r in sweep_rows(results, "blocks-64k") if r["backend"] == backend]:
            snap = series_median(results, "snapshot", backend, "blocks-64k")
            ratio = _ratio(row["seconds"], snap)
            add(f"{backend}: worst case at segment size {row['segment_mib']:g} MiB", "≤ snapshot, same case",
                f"{row['seconds']:.2f} s vs {_s(snap)} s = {_r(ratio)}" if ratio is not None else "not measured",
                None if ratio is None else ratio <= 1.0)
    guest = results.get("guest", [])
    measured = [r for r in guest if r["method"] == "bitmap" and r["run"] > 0]
    stall = max((r["stall_ms"] for r in measured), default=None)
    add("guest: longest write stall during a bitmap backup", "< 100 ms",
        f"{stall:.0f} ms (max of {len(measured)} runs)" if stall is not None else "not measured",
        None if stall is None else stall < 100, "" if stall is not None else results.get("errors", {}).get("guest", ""))
    ratios = [r["records_per_s"] / r["idle_records_per_s"] for r in measured if r["idle_records_per_s"]]
    ratio = _median(ratios)
    add("guest: write throughput during a bitmap backup", "≥ 0.8× idle",
        f"{ratio:.2f}× (median of {len(ratios)} runs)" if ratio is not None else "not measured",
        None if ratio is None else ratio >= 0.8)
    bitmap_rows = [r for r in results.get("series", []) + results.get("sweep", []) if r["method"] == "bitmap"]
    own = max((r["rss_kib"] for r in bitmap_rows), default=None)
    view = _peak(bitmap_rows, "view")
    if own is not None:
        figure = f"kvm-borg {own / 1024:.0f} MiB, segment view {_mib(view)} MiB (max over {len(bitmap_rows)} runs)"
        worst = max(own * 1024, view or 0)
        add("kvm-borg's own peak RSS during a bitmap run", "≤ 150 MiB", figure, worst <= 150 * MiB)
    else:
        add("kvm-borg's own peak RSS during a bitmap run", "≤ 150 MiB", "not measured", None)
    return out


def _verdict(met):
    return "not measured" if met is None else ("**met**" if met else "**MISSED**")


def render(results) -> str:
    d = results.get("dataset", {})
    parts = [f"""# Changed-block backups: the `bitmap` method next to the `snapshot` method

Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from a run started {results.get('started')}
by `{results.get('command')}` ({results.get('seconds', 0) / 60:.0f} min; load average before/after
{_load(results.get('load_before'))} / {_load(results.get('load_after'))}: other work ran on this machine meanwhile).

Machine: {results.get('machine')}; {results.get('restic')}; {results.get('kvm_borg')}.

Disk: one running domain (no OS booted), qcow2 v3, {_size(d.get('disk', 0))} virtual, holding an ext4
file system with {_size(d.get('data', 0))} of files ({_size(d.get('real', 0))} copied from /usr,
the rest generated: half random bytes, half shuffled real text); image file {_size(d.get('image', 0))}.
Every run is cold (page cache dropped). Bitmap runs use segments of {results.get('segment_mib'):g} MiB unless
noted. Changes: {results.get('change_percent'):g} % of the virtual disk, new random data, written through the running
VM (HMP qemu-io), so they are exactly the bitmap's dirty bytes.
"""]
    if results.get("merged_from"):
        parts.append("Merged from separate invocations (their runs were **not** paired or alternated with "
                     "each other):\n\n" + "\n".join(f"- {m}" for m in results["merged_from"]) + "\n")
    errors = results.get("errors") or {}
    if errors:
        parts.append("**Errors** (phases that failed):\n\n" + "\n".join(f"- {k}: `{v[:600]}`" for k, v in errors.items()) + "\n")
    parts.append("## Targets\n\n| target | goal | figure | verdict |\n|---|---|---|---|\n" + "\n".join(
        f"| {t['name']} | {t['goal']} | {t['figure']} | {_verdict(t['met'])}"
        f"{' (' + t['why'][:200] + ')' if t['why'] else ''} |" for t in targets(results)) + "\n")
    for backend in results.get("backends", []):
        if not any(r["backend"] == backend for r in results.get("series", [])):
            continue
        lines = [f"## Series: {backend} (median of {_rounds(results)} rounds)\n",
                 "| case | snapshot (s) | bitmap (s) | bitmap / snapshot full | bitmap / snapshot same case "
                 "| read: snapshot (MiB) | read: bitmap (MiB) | dirty (MiB) | growth: snapshot (MiB) "
                 "| growth: bitmap (MiB) |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        snap_full = series_median(results, "snapshot", backend, "full")
        for case in CASES:
            s = series_median(results, "snapshot", backend, case)
            b = series_median(results, "bitmap", backend, case)
            lines.append(f"| {CASE_TEXT[case]} | {_s(s)} | {_s(b)} | {_r(_ratio(b, snap_full), True)} | {_r(_ratio(b, s))} "
                         f"| {_mib(series_median(results, 'snapshot', backend, case, 'bytes_read'))} "
                         f"| {_mib(series_median(results, 'bitmap', backend, case, 'bytes_read'))} "
                         f"| {_mib(_median([r.get('written') for r in _rows(results, 'snapshot', backend, case) + _rows(results, 'bitmap', backend, case)]))} "
                         f"| {_mib(series_median(results, 'snapshot', backend, case, 'growth'))} "
                         f"| {_mib(series_median(results, 'bitmap', backend, case, 'growth'))} |")
        parts.append("\n".join(lines) + "\n")
    if any(r.get("stretches") for r in results.get("series", [])):
        st = ["## Where the time goes (median seconds per stretch of one backup)\n",
              "start = spawn to the freeze; freeze = snapshot, or backup job + bitmap + view start; store = borg/restic; "
              "release = merge back, or view stop + job end + fold + old checkpoint deleted; end = to the exit.\n",
              "| backend | case | method | start | freeze | store | release | end | total |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for backend in results.get("backends", []):
            for case in CASES:
                for method in ("snapshot", "bitmap"):
                    rows = [r for r in _rows(results, method, backend, case) if r.get("stretches")]
                    if rows:
                        cells = [_s(_median([r["stretches"][k] for r in rows]))
                                 for k in ("start", "freeze", "store", "release", "end")]
                        st.append(f"| {backend} | {case} | {method} | {' | '.join(cells)} "
                                  f"| {_s(_median([r['seconds'] for r in rows]))} |")
        parts.append("\n".join(st) + "\n")
    mem = ["## Memory (peak resident set, max over every run of the series)\n",
           "| variant | kvm-borg (MiB) | segment view (MiB) | borg (MiB) | restic (MiB) |", "|---|---:|---:|---:|---:|"]
    for label in sorted({r["variant"] for r in results.get("series", [])}):
        rows = [r for r in results["series"] if r["variant"] == label]
        mem.append(f"| {label} | {max(r['rss_kib'] for r in rows) / 1024:.0f} | {_mib(_peak(rows, 'view'))} "
                   f"| {_mib(_peak(rows, 'borg'))} | {_mib(_peak(rows, 'restic'))} |")
    if results.get("series"):
        parts.append("\n".join(mem) + "\n")
    if results.get("sweep"):
        sw = ["## Segment size sweep (bitmap, the worst case: 1 % of 64 KiB blocks at random, the same blocks at "
              "every size; the series' segment size is its first round)\n",
              "| segment size | backend | time (s) | read (MiB) | dirty (MiB) | read / dirty | segments dirty / total "
              "| growth (MiB) | borg/restic peak (MiB) | view peak (MiB) | kvm-borg (MiB) | full backup at this size (s) |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in sweep_rows(results, "blocks-64k"):
            full = [r for r in sweep_rows(results, "full") if r["segment_mib"] == row["segment_mib"]
                    and r["backend"] == row["backend"]]
            dirty = sum(x.get("segments_dirty") or 0 for x in row.get("disks", []))
            total = sum(x.get("segments_total") or 0 for x in row.get("disks", []))
            sw.append(f"| {row['segment_mib']:g} MiB | {row['backend']} | {row['seconds']:.2f} | {_mib(row['bytes_read'])} "
                      f"| {_mib(row.get('written'))} | {_r(_ratio(row['bytes_read'], row.get('written')))} "
                      f"| {dirty} / {total} | {_mib(row['growth'])} | {_mib(_peak([row], row['backend']))} "
                      f"| {_mib(_peak([row], 'view'))} | {row['rss_kib'] / 1024:.0f} "
                      f"| {_s(full[0]['seconds']) if full else '-'} |")
        parts.append("\n".join(sw) + "\n")
    view = results.get("view") or {}
    if view.get("view"):
        nonzero = view["nonzero_bytes"]
        parts.append(f"""## Segment view read throughput

`kvm-borg freeze --expose` (bitmap), then, cold, `cat` of every segment file of the view
({view['segments']} files, {nonzero / MiB:.0f} MiB non-zero) next to `nbdcopy URI null:` of the backup
job's NBD export (the whole {view['disk_bytes'] / MiB:.0f} MiB disk; nbdcopy skips holes by block status).

| reader | runs (s) | median (s) | MiB/s of non-zero data |
|---|---|---:|---:|
| segment view (`cat`) | {', '.join(f'{x:.2f}' for x in view['view'])} | {_median(view['view']):.2f} | {nonzero / MiB / _median(view['view']):.0f} |
| NBD export (`nbdcopy`) | {', '.join(f'{x:.2f}' for x in view['nbdcopy'])} | {_median(view['nbdcopy']):.2f} | {nonzero / MiB / _median(view['nbdcopy']):.0f} |
""")
    guest = results.get("guest") or []
    if guest:
        meta = results.get("guest_meta", {})
        g = [f"""## Guest impact (the real test guest, TCG)

The guest's workload fsync()s one 64-byte record every {meta.get('interval_ms')} ms on its
{meta.get('disk_mib')} MiB qcow2 data disk; quiesce `{meta.get('quiesce')}`. Per backup: the longest gap between
two durable records while `kvm-borg backup` runs (its start to its exit) and the records per second in that
window, next to an idle window of the same length just before. Run 0 of each method is its first
(full) backup; the targets use the later runs.
""",
             "| run | method | backup (s) | stall (ms) | idle stall (ms) | records/s | idle records/s | ratio |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in guest:
            g.append(f"| {r['run']} | {r['method']} | {r['seconds']:.2f} | {r['stall_ms']:.0f} | {r['idle_stall_ms']:.0f} "
                     f"| {r['records_per_s']:.0f} | {r['idle_records_per_s']:.0f} "
                     f"| {_r(_ratio(r['records_per_s'], r['idle_records_per_s']))} |")
        parts.append("\n".join(g) + "\n")
    if results.get("series"):
        per = ["## Every run of the series\n",
               "| round | case | variant | s | read (MiB) | growth (MiB) | kvm-borg (MiB) | full read reason |",
               "|---:|---|---|---:|---:|---:|---:|---|"]
        for r in results["series"]:
            reasons = ", ".join(sorted({str(x.get("full_read_reason")) for x in r.get("disks", [])
                                        if x.get("full_read_reason")})) or "-"
            per.append(f"| {r['round'] + 1} | {r['case']} | {r['variant']} | {r['seconds']:.2f} | {_mib(r['bytes_read'])} "
                       f"| {_mib(r['growth'])} | {r['rss_kib'] / 1024:.0f} | {reasons} |")
        parts.append("\n".join(per) + "\n")
    return "\n".join(parts)


def _rounds(results):
    return len({r["round"] for r in results.get("series", [])}) or 0


def _size(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MiB:.0f} MiB"


def _load(values):
    return "-" if not values else "/".join(f"{x:.1f}" for x in values)
