"""Gentle on production, observed on the real processes: during a real bitmap-method backup into borg and
restic of a running and a shut-off domain with `nice: 13`, `ionice: best-effort:6` and per-repository
`upload_ratelimit`, every child of kvm-borg that reads a disk or writes a repository (borg create,
restic backup, the segment view process, qemu-nbd exporting the shut-off domain's image; qemu-img when
the poll catches it) runs at niceness 13 and I/O class best-effort level 6, and the real borg/restic argv
carry the rate in KiB/s. The values are read from /proc (niceness: /proc/PID/stat; I/O priority: the
ioprio_get system call, as `ionice -p` does) while the backup runs, not from kvm-borg's logs."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import threading
import time

from harness import DiskSpec, start_cli
from harness.bitmap import bitmap_settings, short_scratch_dir
from support import assert_back_on_own_images, cli_env, write_config
from test_bitmap_backup import repository

_IOPRIO_GET = {"x86_64": 252, "aarch64": 31}[platform.machine()]
_IOPRIO_WHO_PROCESS = 1
_libc = ctypes.CDLL(None, use_errno=True)


def io_priority(pid: int) -> tuple[int, int] | None:
    """Given a pid, return its (I/O class, level) as the kernel holds them, None if it is gone."""
    value = _libc.syscall(_IOPRIO_GET, _IOPRIO_WHO_PROCESS, pid)
    return None if value < 0 else (value >> 13, value & 0xFF)


def _stat(pid: str) -> tuple[int, int] | None:
    """Given a pid, return (ppid, niceness) from /proc/PID/stat, None if it is gone."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return int(fields[1]), int(fields[16])


class ChildWatcher:
    """Poll /proc every few milliseconds for the descendants of `root` and keep, per pid, its argv,
    niceness and I/O priority as first seen after its exec (wrappers exec'd away are seen too)."""

    def __init__(self, root: int):
        self.root = root
        self.seen: dict[tuple[int, tuple[str, ...]], tuple[int, tuple[int, int] | None]] = {}
        self.root_nice: set[int] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(p))}
            if self.root in stats:
                self.root_nice.add(stats[self.root][1])
            children: dict[int, list[int]] = {}
            for pid, (ppid, _) in stats.items():
                children.setdefault(ppid, []).append(pid)
            todo = list(children.get(self.root, []))
            while todo:
                pid = todo.pop()
                todo += children.get(pid, [])
                try:
                    argv = tuple(open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")[:-1])
                except OSError:
                    continue
                # Read after the argv: the values then belong to that exec (stats may predate it).
                ioprio, stat = io_priority(pid), _stat(str(pid))
                if argv and (pid, argv) not in self.seen and ioprio is not None and stat is not None:
                    self.seen[(pid, argv)] = (stat[1], ioprio)
            time.sleep(0.005)

    def stop(self) -> dict:
        self._done.set()
        self._thread.join(timeout=5)
        return self.seen


def test_children_run_at_the_configured_nice_and_ionice_and_carry_the_upload_ratelimit(
        domain_factory, image_dir, tmp_path, run_dir):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16, fill="sparse")], name="gentle")
    # A shut-off one too: the bitmap method exports its image with qemu-nbd.
    offline = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16, fill="sparse")], running=False,
                                  name="gentle off")
    borg_repo = {**repository("borg", tmp_path), "upload_ratelimit": "50MiB"}
    restic_repo = {**repository("restic", tmp_path), "upload_ratelimit": "512MiB/s"}
    scratch = short_scratch_dir(run_dir)
    try:
        config = write_config(image_dir / "kb", [borg_repo, restic_repo], plugins=[],
                              **bitmap_settings(scratch_dir=str(scratch), nice=13, ionice="best-effort:6"))
        proc = start_cli("backup", domain.name, offline.name, "--json", config=config, env=cli_env())
        watcher = ChildWatcher(proc.pid)
        out, err = proc.communicate(timeout=300)
        seen = watcher.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, err
    results = json.loads(out)["domains"]
    assert len(results) == 2, results
    for result in results:
        assert result["method"] == "bitmap" and all(store["ok"] for store in result["stores"]), result

    print("children seen:", sorted({(os.path.basename(argv[0]), nice, ioprio) for (_, argv), (nice, ioprio) in seen.items()}))

    def find(predicate) -> list[tuple[tuple[str, ...], int, tuple[int, int]]]:
        return [(argv, nice, ioprio) for (_, argv), (nice, ioprio) in seen.items() if predicate(argv)]

    borg_create = find(lambda argv: any(a.endswith("/borg") for a in argv[:2]) and "create" in argv)
    restic_backup = find(lambda argv: argv[0].endswith("restic") and "backup" in argv)
    # (the wrappers' own argv, before their exec, name the command too: take the command's only)
    view = find(lambda argv: os.path.basename(argv[0]).startswith("python") and "kvm_borg.segment_view" in argv)
    qemu_nbd = find(lambda argv: argv[0].endswith("qemu-nbd"))
    # qemu-img (tools.run_tool) lives a few ms: checked when the poll caught it (tests/unit/test_gentle.py runs
    # run_tool's wrapping for real).
    qemu_img = find(lambda argv: argv[0].endswith("qemu-img"))
    assert borg_create and restic_backup and view and qemu_nbd, sorted(argv for (_, argv) in seen)
    assert len(borg_create) == len(restic_backup) == 2, (borg_create, restic_backup)  # one per domain
    for argv, nice, ioprio in borg_create + restic_backup + view + qemu_nbd + qemu_img:
        assert (nice, ioprio) == (13, (2, 6)), (argv, nice, ioprio)  # class 2 = best-effort
    # The rate in whole KiB/s on the real argv: 50 MiB/s = 51200, 512 MiB/s = 524288.
    for argv, _, _ in borg_create:
        assert argv[argv.index("--upload-ratelimit") + 1] == "51200", argv
    for argv, _, _ in restic_backup:
        assert argv[argv.index("--limit-upload") + 1] == "524288", argv
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    # kvm-borg itself keeps its own priority (its merge back is not slowed): only the children are gentle.
    assert watcher.root_nice == {os.getpriority(os.PRIO_PROCESS, 0)}, watcher.root_nice
