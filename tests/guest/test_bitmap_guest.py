"""The bitmap method with the REAL Linux guest writing (tests/guest): what its archives hold.

As tests/test_guest_consistency.py does for the snapshot method: the guest appends fsync'd,
checksummed, sequence-numbered records and prints each seq on its serial console, and qemu-ga's
fsfreeze hook prints "KBHOOK freeze"/"KBHOOK thaw" around FIFREEZE/FITHAW. A quiesced bitmap backup
under that load — the first (full) run and the next (incremental) one — must restore to a file system
that is clean WITHOUT journal replay and holds exactly the records durable at the freeze.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import libvirt
import pytest

from guest import build
from harness.bitmap import (archive_of, backup, bitmap_settings, disk_stats, leftovers, restore_disk, segment_count,
                            short_scratch_dir)
from support import write_config

pytestmark = pytest.mark.slow

AGENT_BOOT_TIMEOUT = 180


def last_freeze_bounds(console_log: Path) -> tuple[int, int]:
    """(last seq printed before the LAST "KBHOOK freeze" line, last seq printed before the "KBHOOK thaw" after
    it): a quiesced archive of that freeze holds records up to a seq in [first, second + 1] (see
    tests/test_guest_consistency.py, console_bounds)."""
    events = build.serial_events(console_log)
    hooks = [i for i, e in enumerate(events) if e.kind == "hook"]
    assert len(hooks) >= 2 and [events[i].value for i in hooks[-2:]] == ["freeze", "thaw"], [events[i] for i in hooks]
    i_freeze, i_thaw = hooks[-2:]

    def last_before(index: int) -> int:
        return max(e.value for e in events[:index] if e.kind == "seq")

    return last_before(i_freeze), last_before(i_thaw)


def assert_quiesced_archive_holds_the_frozen_records(config: Path, g: build.Guest, result: dict, tmp: Path,
                                                     printed_before: int) -> None:
    """The run froze the guest once; its archive restores to a file system clean without replay whose
    records are a gap-free prefix ending exactly at the freeze."""
    assert result["ok"] and result["consistency"] == "quiesced" and result["method"] == "bitmap", result
    before_freeze, before_thaw = last_freeze_bounds(g.console_log)
    image = restore_disk(config, g.name, "vda", tmp / f"restored-{archive_of(result)}.qcow2", archive_of(result))
    fsck = build.fsck_image(image, repair_first=False)
    assert fsck.clean, fsck.output
    check = build.check_records(build.read_records(image, replay_journal=False))
    assert check.ok and not check.torn_tail, check
    assert printed_before <= before_freeze <= check.last_seq <= before_thaw + 1, (
        printed_before, before_freeze, check.last_seq, before_thaw)
    image.unlink()


def test_quiesced_bitmap_backups_under_load_restore_clean_fs_and_exact_record_prefix(guest_factory, image_dir,
                                                                                       tmp_path, run_dir):
    g = guest_factory(fmt="qcow2", size_mib=64)
    scratch = short_scratch_dir(run_dir)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", plugins=[], quiesce="auto",
                          **bitmap_settings(scratch_dir=str(scratch)))
    build.wait_for_agent(g.dom, timeout=AGENT_BOOT_TIMEOUT)
    build.wait_for_progress(g.console_log, 20, timeout=AGENT_BOOT_TIMEOUT)
    segments = segment_count(64 << 20)

    printed_before = build.serial_last_seq(g.console_log)
    first = backup(config, g.name)
    assert disk_stats(first)["vda"]["full_read_reason"], first
    assert_quiesced_archive_holds_the_frozen_records(config, g, first, tmp_path, printed_before)

    build.wait_for_progress(g.console_log, build.serial_last_seq(g.console_log) + 20, timeout=60)
    printed_before = build.serial_last_seq(g.console_log)
    second = backup(config, g.name)
    stats = disk_stats(second)["vda"]
    assert stats["full_read_reason"] is None and 0 < stats["segments_dirty"] < segments, stats
    assert_quiesced_archive_holds_the_frozen_records(config, g, second, tmp_path, printed_before)

    # The guest wrote on through both runs, without an I/O error, and nothing was left behind.
    build.wait_for_progress(g.console_log, build.serial_last_seq(g.console_log) + 10, timeout=60)
    assert build.serial_errors(g.console_log) == []
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert leftovers(g.dom, image_dir / "kb" / "state", scratch) == []
    shutil.rmtree(scratch)
