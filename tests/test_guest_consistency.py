"""Backups of a REAL Linux guest while it writes: what the archive holds, what the guest lives through.

The guest (tests/guest, docs/testing-guest.md) runs qemu-ga and a workload that appends seq-numbered,
CRC-checked records to /data/records.log on an ext4 data disk (vda), fsync()ing each one and then
printing "KBSEQ <seq> <guest mono us>" on its serial console. qemu-ga runs the fsfreeze hook, which
prints "KBHOOK freeze <us>" before FIFREEZE and "KBHOOK thaw <us>" after FITHAW. The console is one
ordered stream, so its line order tells which records were durable before the guest froze.

Each test boots its own guest (TCG, ~8-11 s to the agent); the file runs in about 2-3 minutes.
"""

from __future__ import annotations

import json
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from guest import build
from guest.fixtures import guest_artifacts, guest_factory  # noqa: F401 (fixtures)
from harness import run_cli
from support import (
    archived_meta,
    borg,
    borg_archives,
    cli_env,
    extract_archive,
    journal_entries,
    overlay_files,
    write_config,
)

pytestmark = pytest.mark.slow

AGENT_BOOT_TIMEOUT = 180  # boot to agent is ~7-11 s; generous for a loaded CI machine


# --- helpers ------------------------------------------------------------------------------------


class ConsoleSampler(threading.Thread):
    """Reads the guest's last printed seq every 0.1 s while a backup runs."""

    def __init__(self, console_log: Path):
        super().__init__(daemon=True)
        self.console_log = console_log
        self.stop = threading.Event()
        self.samples: list[int] = []

    def run(self):
        while not self.stop.is_set():
            seq = build.serial_last_seq(self.console_log)
            if seq is not None:
                self.samples.append(seq)
            self.stop.wait(0.1)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


def disk_source(dom, flags: int = 0) -> str:
    """The vda <source file> of the live (flags=0) or persistent (VIR_DOMAIN_XML_INACTIVE) definition."""
    for disk in ET.fromstring(dom.XMLDesc(flags)).findall("./devices/disk"):
        if disk.find("target").get("dev") == "vda":
            return disk.find("source").get("file")
    raise AssertionError("no vda")


def assert_guest_on_own_image(g: build.Guest, image_dir: Path, state_dir: Path) -> None:
    """Running (or defined) on its own data disk; no overlay anywhere below image_dir; no journal entry."""
    if g.dom.isActive():
        assert disk_source(g.dom) == str(g.data_disk)
    assert disk_source(g.dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == str(g.data_disk)
    assert overlay_files(image_dir) == []
    assert journal_entries(state_dir) == []


def boot(guest_factory, fmt="qcow2", min_seq=10, **xml_kwargs) -> build.Guest:
    """A running guest whose agent answers (unless agent=False) and whose workload reached min_seq."""
    g = guest_factory(fmt=fmt, **xml_kwargs)
    if xml_kwargs.get("agent", True):
        build.wait_for_agent(g.dom, timeout=AGENT_BOOT_TIMEOUT)
    build.wait_for_progress(g.console_log, min_seq, timeout=AGENT_BOOT_TIMEOUT)
    return g


def backup(config: Path, g: build.Guest, *args) -> tuple:
    """Run `kvm-borg backup <guest> --json` while sampling the console; return (proc, result, samples)."""
    with ConsoleSampler(g.console_log) as sampler:
        proc = run_cli("backup", g.name, "--json", *args, config=config, env=cli_env(), timeout=300)
    assert proc.stdout, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    return proc, result, sampler.samples


def the_disk_image(repo: Path, archive: str, destination: Path) -> tuple[dict, Path]:
    """Extract an archive with borg; return its meta.json and the path of the extracted vda image."""
    extracted = extract_archive(repo, archive, destination)
    meta = archived_meta(extracted)
    [disk] = meta["disks"]
    assert disk["target"] == "vda"
    return meta, extracted / disk["archive_path"]


def console_bounds(console_log: Path) -> tuple[int, int]:
    """(last seq printed before the "KBHOOK freeze" line, last seq printed before "KBHOOK thaw").

    A record printed before the freeze hook ran was durable before FIFREEZE: it must be in a quiesced
    snapshot. A record in the snapshot was durable before FITHAW; the thaw hook prints after FITHAW,
    so at most one such record (fsynced, its line not printed yet) can follow the last seq printed
    before "KBHOOK thaw". Hence: before_freeze <= archived last seq <= before_thaw + 1.
    """
    events = build.serial_events(console_log)
    hooks = [i for i, e in enumerate(events) if e.kind == "hook"]
    assert [events[i].value for i in hooks] == ["freeze", "thaw"], [events[i] for i in hooks]
    i_freeze, i_thaw = hooks

    def last_before(index: int) -> int:
        return max(e.value for e in events[:index] if e.kind == "seq")

    return last_before(i_freeze), last_before(i_thaw)


def freeze_report(console_log: Path) -> str:
    """One line for the test log: guest freeze window and longest write stall."""
    hooks = build.serial_hooks(console_log)
    stall = build.longest_stall(build.serial_seq_times(console_log))
    window = (hooks[1][1] - hooks[0][1]) / 1000 if len(hooks) == 2 else None
    return f"guest freeze window {window} ms, longest write stall {stall.gap_us / 1000 if stall else None} ms"


# --- tests --------------------------------------------------------------------------------------


def test_quiesced_backup_under_load_restores_clean_fs_and_exact_record_prefix(guest_factory, image_dir, tmp_path):
    g = boot(guest_factory, fmt="qcow2", min_seq=20)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", quiesce="auto")
    printed_before = build.serial_last_seq(g.console_log)

    proc, result, _ = backup(config, g)
    assert proc.returncode == 0, proc.stderr
    assert result["ok"] and result["consistency"] == "quiesced", result
    before_freeze, before_thaw = console_bounds(g.console_log)  # the agent froze and thawed exactly once
    print(freeze_report(g.console_log))

    meta, image = the_disk_image(tmp_path / "repo", result["stores"][0]["archive"], tmp_path / "x")
    assert meta["quiesced"] is True and meta["consistency"] == "quiesced"
    # Frozen file system: `e2fsck -fn` straight on the restored image, no journal replay, no repair.
    fsck = build.fsck_image(image, repair_first=False)
    assert fsck.clean, fsck.output
    check = build.check_records(build.read_records(image, replay_journal=False))
    assert check.ok and not check.torn_tail, check
    # Exactly the records made durable before the freeze (see console_bounds).
    assert printed_before <= before_freeze <= check.last_seq <= before_thaw + 1, (
        printed_before, before_freeze, check.last_seq, before_thaw)
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")


def test_crash_consistent_backup_under_load_replays_to_clean_fs_and_valid_prefix(guest_factory, image_dir,
                                                                                  tmp_path):
    g = boot(guest_factory, fmt="raw", min_seq=20)  # the agent answers, but quiesce is off
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", quiesce="off")
    printed_before = build.serial_last_seq(g.console_log)

    proc, result, samples = backup(config, g)
    assert proc.returncode == 0, proc.stderr
    assert result["ok"] and result["consistency"] == "crash-consistent", result
    assert build.serial_hooks(g.console_log) == []  # never frozen
    printed_after = build.serial_last_seq(g.console_log)

    meta, image = the_disk_image(tmp_path / "repo", result["stores"][0]["archive"], tmp_path / "x")
    assert meta["quiesced"] is False and meta["consistency"] == "crash-consistent"
    # Like after a power cut: `e2fsck -fy` on a copy replays the journal, then `e2fsck -fn` is clean.
    fsck = build.fsck_image(image, repair_first=True)
    assert fsck.repair_rc in (0, 1), fsck.output
    assert fsck.clean, fsck.output
    check = build.check_records(build.read_records(image, replay_journal=True))
    assert check.ok, check  # a torn last record is acceptable here
    assert printed_before <= check.last_seq <= printed_after, (printed_before, check.last_seq, printed_after)
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")


def test_guest_keeps_writing_through_backup_and_commit_and_keeps_every_record(guest_factory, image_dir, tmp_path):
    g = boot(guest_factory, fmt="qcow2", min_seq=10)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", quiesce="required")
    started_at = build.serial_last_seq(g.console_log)

    proc, result, samples = backup(config, g)
    assert proc.returncode == 0, proc.stderr
    assert result["ok"] and result["consistency"] == "quiesced", result
    print(freeze_report(g.console_log), f"backup {result['seconds']:.1f}s, samples {samples[0]}..{samples[-1]}")
    during = max(samples)
    # The counter rose while the backup ran (the workload was never stopped for long) ...
    assert samples == sorted(samples) and during - started_at >= 10, (started_at, samples)
    # ... and keeps rising after the commit, with no I/O error in the guest.
    build.wait_for_progress(g.console_log, during + 20, timeout=60)
    assert build.serial_errors(g.console_log) == []
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")

    # Clean shutdown through the agent (the workload stops, /data is unmounted): the original image
    # holds every record the guest made durable, including those written on the overlay.
    g.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    build.wait_for_shutoff(g.dom, timeout=60)
    printed_last = build.serial_last_seq(g.console_log)
    fsck = build.fsck_image(g.data_disk, repair_first=False)
    assert fsck.clean, fsck.output
    check = build.check_records(build.read_records(g.data_disk, replay_journal=False))
    assert check.ok and not check.torn_tail, check
    assert check.last_seq >= printed_last >= during, (check.last_seq, printed_last, during)
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")


def test_quiesce_required_without_agent_fails_cleanly_and_changes_nothing(guest_factory, image_dir, tmp_path):
    g = boot(guest_factory, fmt="qcow2", min_seq=5, agent=False)  # channel defined, qemu-ga not started
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", quiesce="required")

    proc = run_cli("backup", g.name, config=config, env=cli_env())
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "error" in line or "Traceback" in line]
    assert len(errors) == 1, proc.stderr
    assert "quiesce is required" in errors[0] and "guest agent" in errors[0] and g.name in errors[0]
    assert not any("WARNING" in line for line in lines), proc.stderr
    assert "FAILED" in proc.stdout

    assert borg_archives(tmp_path / "repo") == []
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")
    assert build.serial_hooks(g.console_log) == []
    build.wait_for_progress(g.console_log, build.serial_last_seq(g.console_log) + 10, timeout=60)
    assert build.serial_errors(g.console_log) == []


def test_quiesce_auto_without_agent_takes_crash_consistent_backup_with_warning(guest_factory, image_dir, tmp_path):
    g = boot(guest_factory, fmt="raw", min_seq=5, agent=False)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", quiesce="auto")

    proc, result, _ = backup(config, g)
    assert proc.returncode == 1, proc.stderr  # success with a warning
    assert result["ok"] and result["consistency"] == "crash-consistent", result
    assert any("guest agent not answering" in w and "crash-consistent" in w for w in result["warnings"]), result
    assert any("WARNING" in line and "guest agent not answering" in line for line in proc.stderr.splitlines()), \
        proc.stderr

    meta, image = the_disk_image(tmp_path / "repo", result["stores"][0]["archive"], tmp_path / "x")
    assert meta["quiesced"] is False and meta["consistency"] == "crash-consistent"
    assert json.loads(borg_comment(tmp_path / "repo", meta["archive"]))["consistency"] == "crash-consistent"
    fsck = build.fsck_image(image, repair_first=True)
    assert fsck.repair_rc in (0, 1) and fsck.clean, fsck.output
    assert build.check_records(build.read_records(image)).ok
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")


@pytest.mark.parametrize("quiesce", ["required", "auto"])
def test_snapshot_failing_after_the_freeze_leaves_guest_thawed_and_on_its_image(guest_factory, image_dir, tmp_path,
                                                                               quiesce):
    g = boot(guest_factory, fmt="qcow2", min_seq=10)
    # libvirt freezes the guest first, then creates the overlay in overlay_dir: root can create the
    # file, but QEMU (libvirt-qemu) cannot reach a 0700 root directory, so blockdev-add fails with
    # "Permission denied" while the guest is frozen. libvirt must thaw it on that error path.
    locked = image_dir / "no-access"
    locked.mkdir(mode=0o700)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", quiesce=quiesce, overlay_dir=str(locked))

    proc, result, _ = backup(config, g)
    assert proc.returncode == 2, proc.stderr
    assert not result["ok"] and result["stores"] == []
    assert "snapshot failed" in result["error"] and "Permission denied" in result["error"], result
    assert "\n" not in result["error"]
    if quiesce == "auto":  # the crash-consistent retry failed the same way, and the error says both did
        assert "the quiesced attempt failed too" in result["error"], result
    # The freeze really happened (and the thaw), once per snapshot attempt: `auto` retries without quiesce.
    assert [a for a, _ in build.serial_hooks(g.console_log)] == ["freeze", "thaw"]
    assert build.agent_command(g.dom, "guest-fsfreeze-status") == "thawed"
    build.wait_for_progress(g.console_log, build.serial_last_seq(g.console_log) + 20, timeout=60)
    assert build.serial_errors(g.console_log) == []

    assert list(locked.iterdir()) == []
    assert borg_archives(tmp_path / "repo") == []
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")


def test_slow_freeze_hook_delays_the_snapshot_but_the_backup_stays_quiesced(guest_factory, image_dir, tmp_path):
    # A guest whose freeze takes seconds (a hook flushing a database, say): libvirt waits for it
    # (guest_agent_timeout bounds only kvm-borg's ping, not the freeze), the writes go on until
    # FIFREEZE, and the archive is still exactly what was durable at the freeze.
    g = boot(guest_factory, fmt="qcow2", min_seq=10)
    build.set_freeze_hook_delay(g.dom, "freeze", 4000)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", quiesce="required",
                          guest_agent_timeout="2s")
    printed_before = build.serial_last_seq(g.console_log)

    proc, result, _ = backup(config, g)
    assert proc.returncode == 0, proc.stderr
    assert result["ok"] and result["consistency"] == "quiesced", result
    assert result["freeze_seconds"] >= 3.9, result
    before_freeze, before_thaw = console_bounds(g.console_log)
    assert before_freeze - printed_before >= 20, (printed_before, before_freeze)  # it wrote while the hook slept
    print(freeze_report(g.console_log))
    assert build.agent_command(g.dom, "guest-fsfreeze-status") == "thawed"

    meta, image = the_disk_image(tmp_path / "repo", result["stores"][0]["archive"], tmp_path / "x")
    assert meta["quiesced"] is True
    assert build.fsck_image(image, repair_first=False).clean
    check = build.check_records(build.read_records(image, replay_journal=False))
    assert check.ok and not check.torn_tail, check
    assert before_freeze <= check.last_seq <= before_thaw + 1, (before_freeze, check.last_seq, before_thaw)
    build.wait_for_progress(g.console_log, build.serial_last_seq(g.console_log) + 10, timeout=60)
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")


def test_hung_agent_with_quiesce_auto_falls_back_to_crash_consistent_after_the_timeout(guest_factory, image_dir,
                                                                                      tmp_path):
    # qemu-ga connected but not answering (SIGSTOPped through its own guest-exec): the ping gives up
    # after guest_agent_timeout and the snapshot is taken without QUIESCE, never touching the agent.
    g = boot(guest_factory, fmt="qcow2", min_seq=10)
    build.agent_command(g.dom, "guest-exec", {"path": "/bin/sh",
                                              "arg": ["-c", "kill -STOP $(cat /run/agent.pid)"]})
    time.sleep(1)
    with pytest.raises(libvirt.libvirtError):
        build.agent_command(g.dom, "guest-ping", timeout=2)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", quiesce="auto", guest_agent_timeout="3s")

    proc, result, samples = backup(config, g)  # bounded (run_cli's timeout): a hung ping would never end
    assert proc.returncode == 1, proc.stderr
    assert result["ok"] and result["consistency"] == "crash-consistent", result
    assert any("guest agent not answering" in w for w in result["warnings"]), result
    assert build.serial_hooks(g.console_log) == []
    assert max(samples) > samples[0]
    build.wait_for_progress(g.console_log, build.serial_last_seq(g.console_log) + 10, timeout=60)
    assert build.serial_errors(g.console_log) == []
    assert_guest_on_own_image(g, image_dir, image_dir / "kb" / "state")


def borg_comment(repo: Path, archive: str) -> str:
    return json.loads(borg("info", "--json", f"{repo}::{archive}").stdout)["archives"][0]["comment"]
