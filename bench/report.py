"""The suite's report: markdown tables, target verdicts and PNG plots from the figures of one run."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench import fixed_cost

MiB = 1 << 20

LABELS = {
    "read": "read limit: `cat IMAGE > /dev/null`",
    "borg-plain": "plain sequence: snapshot, `borg create`, blockcommit",
    "borg-kvm": "`kvm-borg backup` → borg",
    "borg-kvm-buzhash": "`kvm-borg backup` → borg, chunker `buzhash,19,23,21,4095`",
    "restic-plain": "plain sequence: snapshot, `restic backup`, blockcommit",
    "restic-kvm": "`kvm-borg backup` → restic",
    "nbd-copy": "`virtnbdbackup -l copy`",
    "nbd-copy-z": "`virtnbdbackup -l copy -z` (lz4)",
}
SHORT = {
    "read": "cat (read limit)", "borg-plain": "plain borg", "borg-kvm": "kvm-borg → borg",
    "borg-kvm-buzhash": "kvm-borg → borg (buzhash)", "restic-plain": "plain restic",
    "restic-kvm": "kvm-borg → restic", "nbd-copy": "virtnbdbackup copy", "nbd-copy-z": "virtnbdbackup copy -z",
}
PLOTS = ("full-backup.png", "repeat-runs.png", "restore-and-commit.png")


def med(values):
    values = [x for x in values if x is not None]
    return statistics.median(values) if values else None


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ratio(a, b):
    return None if a is None or not b else a / b


# --- targets -----------------------------------------------------------------------------------


def _paired(results, a: str, b: str) -> tuple[float | None, float | None]:
    """(ratio of medians, median of paired ratios) of variant a over variant b in the full phase."""
    full = results.get("full") or {}
    if not full.get(a) or not full.get(b):
        return None, None
    ta, tb = [r["seconds"] for r in full[a]], [r["seconds"] for r in full[b]]
    return _ratio(med(ta), med(tb)), med([x / y for x, y in zip(ta, tb)])


def repeat_added(results, variant: str, level: float) -> list[int]:
    steps = (results.get("repeat") or {}).get("steps", [])
    return [s["results"][variant]["added"] for s in steps if s["level"] == level and variant in s["results"]]


def repeat_seconds(results, variant: str, level: float) -> list[float]:
    steps = (results.get("repeat") or {}).get("steps", [])
    return [s["results"][variant]["seconds"] for s in steps if s["level"] == level and variant in s["results"]]


def restore_figures(results) -> dict | None:
    res = results.get("restore")
    if not res or not res.get("kvm-borg") or not res.get("borg-extract"):
        return None
    out = {}
    for variant in ("kvm-borg", "borg-extract"):
        rows = res[variant]
        out[variant] = {"seconds": med([r["seconds"] for r in rows]),
                        "throughput": med([r["size"] / r["seconds"] for r in rows]),
                        "size": rows[0]["size"], "allocated": med([r["allocated"] for r in rows])}
    out["ratio"] = out["kvm-borg"]["throughput"] / out["borg-extract"]["throughput"]
    return out


def targets(results) -> list[dict]:
    """Each target with its figure and verdict (met None: not measured)."""
    rows = []
    for kind, plain, kvm in (("borg", "borg-plain", "borg-kvm"), ("restic", "restic-plain", "restic-kvm")):
        ratio, paired = _paired(results, kvm, plain)
        rows.append({"target": f"kvm-borg backup → {kind} ≤ 1.10 × the plain {kind} sequence (medians)",
                     "figure": "-" if ratio is None else f"{ratio:.3f} × (median of paired ratios {paired:.3f})",
                     "met": None if ratio is None else ratio <= 1.10})
    added = repeat_added(results, "borg-kvm", 0.0)
    rows.append({"target": "a repeat of an unchanged VM adds < 1 MiB to the borg repository",
                 "figure": "-" if not added else f"{med(added) / MiB:.3f} MiB median, {max(added) / MiB:.3f} MiB max "
                                                 f"({len(added)} repeats)",
                 "met": None if not added else max(added) < MiB})
    fig = restore_figures(results)
    if fig is None:
        rows.append({"target": "kvm-borg restore ≥ 0.8 × the throughput of `borg extract`, sparse result",
                     "figure": "-", "met": None})
    else:
        k = fig["kvm-borg"]
        sparse = k["allocated"] <= (results.get("restore") or {}).get("source_allocated", k["size"]) + MiB
        fsync = med([r.get("fsync_seconds") for r in results["restore"]["borg-extract"]])
        durable = ""
        if fsync is not None:
            b = fig["borg-extract"]
            durable = f"; {k['throughput'] / (b['size'] / (b['seconds'] + fsync)):.3f} × `borg extract` + `sync`"
        rows.append({"target": "kvm-borg restore ≥ 0.8 × the throughput of `borg extract`, sparse result",
                     "figure": f"{fig['ratio']:.3f} × ({k['throughput'] / MiB:.0f} vs "
                               f"{fig['borg-extract']['throughput'] / MiB:.0f} MiB/s); allocated {_mib(k['allocated'])} "
                               f"of {_mib(k['size'])} MiB" + ("" if sparse else " — NOT sparse") + durable,
                     "met": fig["ratio"] >= 0.8 and sparse})
    if results.get("fixed_cost"):
        rows += fixed_cost.targets(results["fixed_cost"])
    else:
        rows += [{"target": f"kvm-borg's own fixed cost per backup ≤ {fixed_cost.FIXED_COST_TARGET_S:.2f} s (median)",
                  "figure": "-", "met": None},
                 {"target": f"kvm-borg backup of a small domain ≤ {fixed_cost.OVERHEAD_TARGET:.2f} × the plain "
                            "sequence (medians)", "figure": "-", "met": None}]
    return rows


# --- markdown ------------------------------------------------------------------------------------


def _full_section(results) -> str:
    full = {k: rows for k, rows in (results.get("full") or {}).items() if rows}
    if not full:
        return ""
    ref = results.get("reference", {})
    image = ref.get("image") or 0
    read_med = med([r["seconds"] for r in full.get("read", [])])
    lines = ["| variant | median (s) | min (s) | max (s) | image MiB/s | × read limit | × its plain sequence "
             "| stored (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    plain_of = {"borg-kvm": "borg-plain", "restic-kvm": "restic-plain"}
    for variant, rows in full.items():
        if not rows:
            continue
        secs = [r["seconds"] for r in rows]
        m = med(secs)
        plain = plain_of.get(variant)
        vs_plain = _ratio(m, med([r["seconds"] for r in full[plain]])) if plain in full else None
        stored = med([r.get("stored") for r in rows]) if variant != "read" else None
        lines.append(f"| {LABELS[variant]} | **{m:.2f}** | {min(secs):.2f} | {max(secs):.2f} | "
                     f"{image / MiB / m:,.0f} | {_ratio(m, read_med):.1f} | "
                     f"{'-' if vs_plain is None else f'{vs_plain:.3f}'} | {_mib(stored)} |")
    pairs = [(k, p) for k, p in (("borg-kvm", "borg-plain"), ("restic-kvm", "restic-plain")) if k in full and p in full]
    per_run = ""
    if pairs:
        head = "| run | " + " | ".join(f"{SHORT[p]} (s) | {SHORT[k]} (s) | ratio" for k, p in pairs) + " |"
        sep = "|---:|" + "---:|---:|---:|" * len(pairs)
        body = []
        for n in range(len(full[pairs[0][0]])):
            cells = []
            for k, p in pairs:
                a, b = full[k][n]["seconds"], full[p][n]["seconds"]
                cells.append(f"{b:.2f} | {a:.2f} | {a / b:.3f}")
            body.append(f"| {n + 1} | " + " | ".join(cells) + " |")
        per_run = "\n\nPaired runs (same round, alternating order):\n\n" + "\n".join([head, sep, *body])
    steps = ""
    with_steps = [k for k in ("borg-plain", "borg-kvm", "restic-plain", "restic-kvm")
                  if k in full and all("steps" in r for r in full[k])]
    if with_steps:
        rows = ["| variant | snapshot (s) | store: borg/restic (s) | commit + pivot (s) | the rest (s) | total (s) |",
                "|---|---:|---:|---:|---:|---:|"]
        for k in with_steps:
            parts = [med([r["steps"][key] for r in full[k]]) for key in ("snapshot_s", "store_s", "commit_s")]
            rest = med([r["seconds"] - sum(r["steps"].values()) for r in full[k]])
            rows.append(f"| {SHORT[k]} | " + " | ".join(f"{x:.2f}" for x in parts)
                        + f" | {rest:.2f} | {med([r['seconds'] for r in full[k]]):.2f} |")
        steps = ("\n\nWhere the time goes (medians; the plain sequences' steps are the `virsh` and `borg`/`restic` "
                 "commands, kvm-borg's come from its `--json` result; \"the rest\" is process start-up, connecting "
                 "to libvirt, staging the XML and meta.json):\n\n" + "\n".join(rows))
    return ("## Full backups (cases 1–5)\n\nEach run writes into a fresh repository (or output directory), so every "
            "figure is a full backup; the variants alternate order (forward, then backward). Every run reads the image "
            "cold: it is dropped from the page cache before each run (borg drops what it reads itself, so a warm "
            "cache could not be kept equal for every variant).\n\n"
            + "\n".join(lines) + per_run + steps + "\n")


def _repeat_section(results) -> str:
    rep = results.get("repeat")
    if not rep or not rep.get("steps"):
        return ""
    levels = sorted({s["level"] for s in rep["steps"]})
    variants = list(rep["initial"].keys())
    unit = rep.get("unit", 65536)
    written = {lv: med([s["written"] for s in rep["steps"] if s["level"] == lv]) for lv in levels}
    head = "| variant | initial full | " + " | ".join(f"{lv:g} % changed" for lv in levels) + " |"
    sep = "|---|---:|" + "---:|" * len(levels)
    t_rows, a_rows = [], []
    for variant in variants:
        init = rep["initial"][variant]
        t_rows.append(f"| {LABELS[variant]} | {init['seconds']:.2f} | "
                      + " | ".join(_s(med(repeat_seconds(results, variant, lv))) for lv in levels) + " |")
        a_rows.append(f"| {LABELS[variant]} | {_mib(init['added'])} | "
                      + " | ".join(_mib(med(repeat_added(results, variant, lv))) for lv in levels) + " |")
    written_row = ("| data written into the disk before the backup (MiB) | - | "
                   + " | ".join(_mib(written[lv]) for lv in levels) + " |")
    if all("image" in s for s in rep["steps"]):
        written_row += ("\n| the image file after the writes (MiB, median) | "
                        f"{_mib(results.get('reference', {}).get('image'))} | "
                        + " | ".join(_mib(med([s["image"] for s in rep["steps"] if s["level"] == lv])) for lv in levels)
                        + " |")
    rounds = max(s["round"] for s in rep["steps"])
    growth = []
    for variant in variants:
        total = sum(s["results"][variant]["added"] for s in rep["steps"] if variant in s["results"])
        growth.append(f"{SHORT[variant]} {total / MiB:,.1f} MiB")
    return (f"## Repeat runs (cases 6 and 9)\n\nOne repository per variant, kept: an initial full backup, then "
            f"{rounds} round(s) of steps; each step first changes {', '.join(f'{lv:g} %' for lv in levels)} of the "
            f"disk's {unit // 1024} KiB blocks (chosen at random over the whole virtual disk, new random data, "
            f"written through the running VM's block layer with HMP `qemu-io`), then backs up with every variant in "
            f"rotating order. Medians over the rounds.\n\nSeconds per backup:\n\n"
            + "\n".join([head, sep, *t_rows]) + "\n\nBytes added to the repository (MiB, growth of the repository "
            "directory on disk):\n\n" + "\n".join([head, sep, written_row, *a_rows])
            + f"\n\nChunker params (case 9), total growth over all repeat steps: {'; '.join(growth)}.\n")


def _restore_section(results) -> str:
    fig = restore_figures(results)
    if fig is None:
        return ""
    res = results["restore"]
    rows = ["| variant | median (s) | MiB/s | file size (MiB) | allocated (MiB) |", "|---|---:|---:|---:|---:|"]
    names = {"kvm-borg": "`kvm-borg restore DOMAIN --archive A --disk vda --to FILE`",
             "borg-extract": "`borg extract --sparse REPO::A IMAGE`"}
    for variant in ("kvm-borg", "borg-extract"):
        f = fig[variant]
        rows.append(f"| {names[variant]} | {f['seconds']:.2f} | {f['throughput'] / MiB:,.0f} | {_mib(f['size'])} "
                    f"| {_mib(f['allocated'])} |")
    fsync = med([r.get("fsync_seconds") for r in res["borg-extract"]])
    if fsync is not None:
        f = fig["borg-extract"]
        rows.append(f"| `borg extract --sparse` + `sync FILE` (durable, as kvm-borg's fsync) | {f['seconds'] + fsync:.2f} "
                    f"| {f['size'] / MiB / (f['seconds'] + fsync):,.0f} | {_mib(f['size'])} | {_mib(f['allocated'])} |")
    same = {True: "identical", False: "DIFFERENT", None: "not compared"}[res.get("identical")]
    return (f"## Restore (case 7)\n\nArchive `{res['archive']}` (kvm-borg → borg, `fixed,4194304`), "
            f"{len(res['kvm-borg'])} runs each, alternating, the repository dropped from the page cache before each "
            f"run. The source image takes {_mib(res['source_allocated'])} "
            f"MiB on disk. The two restored files are {same} (cmp).\n\n" + "\n".join(rows)
            + f"\n\nkvm-borg restore / borg extract throughput: **{fig['ratio']:.3f}**.\n")


def _commit_section(results) -> str:
    rows = results.get("commit")
    if not rows:
        return ""
    amounts = sorted({r["mib"] for r in rows})
    out = ["| MiB written while the backup ran | blockcommit + pivot (s, median) | runs | writing took (s) |",
           "|---:|---:|---:|---:|"]
    for mib in amounts:
        sel = [r for r in rows if r["mib"] == mib]
        out.append(f"| {mib} | {med([r['commit_seconds'] for r in sel]):.2f} | {len(sel)} | "
                   f"{med([r['write_seconds'] for r in sel]):.2f} |")
    return ("## Blockcommit time against data written during the backup (case 8)\n\n`kvm-borg backup` of the reference "
            "domain with a plugin (`bench/writer_plugin.py`) that writes N MiB of random data through the VM's block "
            "layer right after the snapshot, i.e. into the overlay; the commit merges it back.\n\n"
            + "\n".join(out) + "\n")


def _guest_section(results) -> str:
    guest = results.get("guest")
    if not guest or not guest.get("runs"):
        return ""
    modes = guest["modes"]
    metrics = [("longest write stall, snapshot phase (ms)", "stall_snapshot_ms", 1),
               ("longest write stall, commit phase (ms)", "stall_commit_ms", 1),
               ("longest write stall, idle reference (ms)", "stall_idle_ms", 1),
               ("freeze window in the guest, FIFREEZE..FITHAW (ms)", "freeze_window_ms", 1),
               ("snapshot call, host (ms)", "snapshot_call_s", 1000),
               ("blockcommit + pivot, host (ms)", "commit_s", 1000)]
    head = "| metric | " + " | ".join(f"quiesce={m}: median | max" for m in modes) + " |"
    sep = "|---|" + "---:|---:|" * len(modes)
    lines = [head, sep]
    for label, key, scale in metrics:
        cells = []
        for m in modes:
            values = [r[key] * scale for r in guest["runs"] if r["mode"] == m and r[key] is not None and r[key] == r[key]]
            cells.append("- | -" if not values else f"{med(values):.0f} | {max(values):.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    runs = sum(1 for r in guest["runs"] if r["mode"] == modes[0])
    return ("## Guest impact (case 8)\n\nThe real test guest of `tests/guest` (TCG, a workload that fsync()s one "
            f"record every 20 ms), {runs} backups per quiesce mode: the longest gap between two durable records per "
            "phase of the backup. Details per run: [guest-impact.md](guest-impact.md).\n\n" + "\n".join(lines) + "\n")


def _fixed_cost_section(results) -> str:
    figures = results.get("fixed_cost")
    if not figures:
        return ""
    s = fixed_cost.summary(figures)
    return ("## Fixed cost (case 10)\n\n"
            f"A small domain ({figures['image'] / MiB:,.0f} MiB image), {figures['runs']} paired rounds: kvm-borg's own "
            f"fixed cost per backup (start → first libvirt call, plus after the last repository stored → exit, "
            f"without the merge back) **{s['fixed'] * 1000:.0f} ms** median ({s['head'] * 1000:.0f} ms before the first "
            f"libvirt call); `kvm-borg backup` {s['kvm-borg']:.2f} s against the plain sequence's {s['plain']:.2f} s "
            f"({s['overhead']:.3f} ×). Every stretch of every run: [fixed-cost.md](fixed-cost.md).\n")


def render(results, plots: bool) -> str:
    ref = results.get("reference")
    ref_text = "-"
    if ref:
        ref_text = (f"a running domain (no OS booted) with one {ref['format']} disk of {ref['disk'] / MiB:,.0f} MiB "
                    f"virtual size holding an ext4 file system (`mkfs.ext4 -d`) with {ref['data'] / MiB:,.0f} MiB of "
                    f"real files copied from /usr/lib and /usr/share; the image file is {ref['image'] / MiB:,.0f} MiB")
    target_rows = ["| target | figure | verdict |", "|---|---|---|"]
    for t in targets(results):
        verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**MISSED**")
        target_rows.append(f"| {t['target']} | {t['figure']} | {verdict} |")
    versions = ", ".join(f"{v}" for v in results.get("versions", {}).values())
    errors = ""
    if results.get("errors") or results.get("nbd_unavailable"):
        items = [f"- {phase}: {msg}" for phase, msg in results.get("errors", {}).items()]
        if results.get("nbd_unavailable"):
            items.append(f"- virtnbdbackup: {results['nbd_unavailable']}")
        errors = "## Not measured\n\n" + "\n".join(items) + "\n\n"
    figures = ""
    if plots:
        figures = "## Plots\n\n" + "\n\n".join(f"![{p}]({p})" for p in PLOTS) + "\n\n"
    sections = [_full_section(results), _repeat_section(results), _restore_section(results),
                _commit_section(results), _guest_section(results), _fixed_cost_section(results)]
    return (f"# kvm-borg benchmark suite\n\nGenerated {results.get('started', '?')} by\n`{results['command']}`\n"
            f"(the whole suite took {results.get('seconds', 0) / 60:.1f} min).\n\n"
            f"Machine: {results.get('machine', '?')}; {versions}.\n\nReference domain: {ref_text}. Repositories are "
            f"encrypted (borg `repokey-blake2`, lz4, kvm-borg's `fixed,4194304` unless said otherwise; restic 0.14 "
            f"defaults); kvm-borg runs with `quiesce: off` (the reference domain has no guest agent, the plain "
            f"sequences do not quiesce either).\n\n## Targets\n\n" + "\n".join(target_rows) + "\n\n" + errors
            + "\n".join(s for s in sections if s) + "\n" + figures).rstrip() + "\n"


# --- plots ---------------------------------------------------------------------------------------


def plot(results, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    full = {k: rows for k, rows in (results.get("full") or {}).items() if rows}
    if full:
        image = results["reference"]["image"]
        names = list(full.keys())
        fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.6))
        for i, name in enumerate(names):
            secs = [r["seconds"] for r in full[name]]
            m = med(secs)
            ax.barh(i, m, color="#4c72b0" if "kvm" in name else ("#999999" if name == "read" else "#dd8452"))
            ax.plot(secs, [i] * len(secs), "k|", markersize=12)
            ax.text(max(secs), i, f"  {m:.1f} s, {image / MiB / m:,.0f} MiB/s", va="center", fontsize=8)
        ax.set_yticks(range(len(names)), [SHORT[n] for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("seconds (bar: median, ticks: each run)")
        ax.set_title(f"Full backup of a {image / MiB:,.0f} MiB image ({results['reference']['data'] / MiB:,.0f} MiB "
                     f"of files), fresh repository each run")
        ax.set_xlim(0, max(max(r["seconds"] for r in rows) for rows in full.values()) * 1.35)
        fig.tight_layout()
        written.append(_save(fig, out_dir / PLOTS[0]))
    rep = results.get("repeat") or {}
    if rep.get("steps"):
        levels = sorted({s["level"] for s in rep["steps"]})
        variants = list(rep["initial"].keys())
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / len(variants)
        for j, variant in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(levels))]
            added = [max(med(repeat_added(results, variant, lv)) or 0, 1) / MiB for lv in levels]
            secs = [med(repeat_seconds(results, variant, lv)) or 0 for lv in levels]
            ax1.bar(xs, added, width, label=SHORT[variant])
            ax2.bar(xs, secs, width, label=SHORT[variant])
        written_mib = [med([s["written"] for s in rep["steps"] if s["level"] == lv]) / MiB for lv in levels]
        shown = [(i, w) for i, w in enumerate(written_mib) if w > 0]
        if shown:
            ax1.plot([i for i, _ in shown], [w for _, w in shown], "k_", markersize=40, markeredgewidth=2,
                     label="data written into the disk")
        for ax in (ax1, ax2):
            ax.set_xticks(range(len(levels)), [f"{lv:g} % of blocks changed" for lv in levels])
        ax1.set_yscale("log")
        ax1.set_ylabel("MiB added to the repository (median, log)")
        ax2.set_ylabel("seconds per backup (median)")
        handles, labels = ax1.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False, markerscale=0.4)
        ax1.set_title("Repository growth per repeat backup")
        ax2.set_title("Time per repeat backup")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        written.append(_save(fig, out_dir / PLOTS[1]))
    restore, commit = restore_figures(results), results.get("commit")
    if restore or commit:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        if restore:
            names = ["kvm-borg", "borg-extract"]
            thr = [restore[n]["throughput"] / MiB for n in names]
            labels = ["kvm-borg restore\n--disk vda --to FILE", "borg extract --sparse"]
            allocated = [restore[n]["allocated"] for n in names]
            fsync = med([r.get("fsync_seconds") for r in results["restore"]["borg-extract"]])
            if fsync is not None:
                b = restore["borg-extract"]
                thr.append(b["size"] / (b["seconds"] + fsync) / MiB)
                labels.append("borg extract --sparse\n+ sync FILE")
                allocated.append(b["allocated"])
            ax1.bar(labels, thr, color=["#4c72b0", "#dd8452", "#e8a77f"][:len(thr)])
            for i, value in enumerate(thr):
                ax1.text(i, value, f"{value:,.0f} MiB/s\nallocated {allocated[i] / MiB:,.0f} MiB",
                         ha="center", va="bottom", fontsize=8)
            ax1.set_ylim(0, max(thr) * 1.3)
            ax1.set_ylabel("MiB/s of image restored (median)")
            ax1.set_title(f"Restore: ratio {restore['ratio']:.2f}")
        if commit:
            ax2.plot([r["mib"] for r in commit], [r["commit_seconds"] for r in commit], "o", color="#4c72b0")
            amounts = sorted({r["mib"] for r in commit})
            ax2.plot(amounts, [med([r["commit_seconds"] for r in commit if r["mib"] == a]) for a in amounts], "-",
                     color="#4c72b0")
            ax2.set_xlabel("MiB written into the overlay while the backup ran")
            ax2.set_ylabel("blockcommit + pivot (s)")
            ax2.set_title("Commit time against data written")
            ax2.set_ylim(bottom=0)
        fig.tight_layout()
        written.append(_save(fig, out_dir / PLOTS[2]))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write(results, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write suite.md (+ guest-impact.md, fixed-cost.md, the plots); return the files written."""
    files = []
    if plots:
        files += plot(results, out_dir)
    shown = plots and bool(files)
    md = render(results, shown)
    if shown:  # only the plots that exist
        for name in PLOTS:
            if not (out_dir / name).exists() or (out_dir / name) not in files:
                md = md.replace(f"![{name}]({name})\n\n", "").replace(f"![{name}]({name})", "")
    (out_dir / "suite.md").write_text(md)
    files.insert(0, out_dir / "suite.md")
    guest = results.get("guest") or {}
    if guest.get("report"):
        (out_dir / "guest-impact.md").write_text(guest["report"])
        files.append(out_dir / "guest-impact.md")
    if results.get("fixed_cost"):
        (out_dir / "fixed-cost.md").write_text(
            fixed_cost.render(results["fixed_cost"], results["command"], results.get("machine", "?")))
        files.append(out_dir / "fixed-cost.md")
    return files
