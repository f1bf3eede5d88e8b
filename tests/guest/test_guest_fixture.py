"""The test guest itself: boots, agent answers, workload writes, fsfreeze works,
records survive a hard power-off, and a graceful agent shutdown leaves a clean fs."""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest

from guest import build

def test_parse_and_check_records_unit():
    # Records as the C workload writes them, built here from the documented layout.
    import struct
    import zlib

    def rec(seq: int) -> bytes:
        body = b"KBR1" + struct.pack("<IQQ", 64, seq, 123) + bytes((seq * 31 + i) & 0xFF for i in range(36))
        return body + struct.pack("<I", zlib.crc32(body))

    good = b"".join(rec(i) for i in range(5))
    c = build.check_records(build.parse_records(good))
    assert (c.count, c.last_seq, c.gap_free, c.torn_tail, c.ok) == (5, 4, True, False, True)

    torn = build.check_records(build.parse_records(good + rec(5)[:20]))
    assert (torn.count, torn.gap_free, torn.torn_tail, torn.ok) == (5, True, True, True)

    gap = build.check_records(build.parse_records(rec(0) + rec(2) + rec(3)))
    assert not gap.ok and gap.count == 1 and gap.errors

    bad = bytearray(good)
    bad[64 * 2 + 30] ^= 1  # payload bit flip in record 2
    corrupt = build.check_records(build.parse_records(bytes(bad)))
    assert not corrupt.ok and corrupt.count == 2

    assert build.check_records([]) == build.RecordCheck(0, None, True, False)


def test_guest_kernel_is_the_vmlinuz_payload_booted_through_its_pvh_entry(guest_artifacts):
    """The fixture's kernel is Debian's vmlinuz itself, decompressed: the same ELF, with the PVH note QEMU needs."""
    from guest import pvh

    assert guest_artifacts.manifest["boot"] == "pvh", guest_artifacts
    elf = guest_artifacts.kernel.read_bytes()
    assert pvh.has_pvh_entry(elf)
    assert pvh.decompressed_kernel(Path(guest_artifacts.manifest["bzimage"]).read_bytes()) == elf
    assert not pvh.has_pvh_entry(elf[:64]) and pvh.decompressed_kernel(b"no xz payload here") is None


@pytest.mark.slow
def test_guest_boots_freezes_and_keeps_records(guest_factory, guest_artifacts, record_property):
    g = guest_factory(fmt="qcow2")
    dom = g.dom

    agent_s = build.wait_for_agent(dom, timeout=120)
    boot_to_agent = time.monotonic() - g.started_at
    record_property("boot_to_agent_s", round(boot_to_agent, 2))
    print(f"boot to agent: {boot_to_agent:.1f}s (waited {agent_s:.1f}s)")
    assert "state='connected'" in dom.XMLDesc(0)

    # The workload counter rises.
    s1 = build.wait_for_progress(g.console_log, 5, timeout=60)
    s2 = build.wait_for_progress(g.console_log, s1 + 10, timeout=60)
    assert s2 > s1

    # Freeze: only /data (ext4 on vda) is freezable, so exactly one fs.
    assert build.agent_command(dom, "guest-fsfreeze-freeze", timeout=30) == 1
    try:
        assert build.agent_command(dom, "guest-fsfreeze-status") == "frozen"
        time.sleep(0.5)
        f1 = build.serial_last_seq(g.console_log)
        time.sleep(2)
        f2 = build.serial_last_seq(g.console_log)
        # The writer is blocked while frozen (one record may have been in flight).
        assert f2 - f1 <= 1, (f1, f2)
    finally:
        thawed = build.agent_command(dom, "guest-fsfreeze-thaw", timeout=30)
    assert thawed == 1
    assert build.agent_command(dom, "guest-fsfreeze-status") == "thawed"
    s3 = build.wait_for_progress(g.console_log, f2 + 10, timeout=60)
    assert build.serial_errors(g.console_log) == []

    # Hard power-off while the workload is writing.
    dom.destroy()
    printed = build.serial_last_seq(g.console_log)
    assert printed >= s3

    records = build.read_records(g.data_disk)
    check = build.check_records(records)
    print(f"records: {check}")
    assert check.ok, check.errors
    # Every KBSEQ was printed after fsync(), so it must be on the disk.
    assert check.last_seq >= printed, (check.last_seq, printed)

    # Without journal replay the on-disk metadata may lag, but what is there is a valid prefix.
    raw_check = build.check_records(build.read_records(g.data_disk, replay_journal=False))
    assert raw_check.ok and raw_check.count <= check.count + 1

    fsck = build.fsck_image(g.data_disk)
    assert fsck.repair_rc in (0, 1), fsck.output
    assert fsck.clean, fsck.output


@pytest.mark.slow
def test_guest_agent_shutdown_is_clean_and_resumes(guest_factory, libvirt_conn):
    g = guest_factory(fmt="raw")
    build.wait_for_agent(g.dom, timeout=120)
    build.wait_for_progress(g.console_log, 5, timeout=60)

    # libvirt's agent shutdown runs /sbin/shutdown in the guest: it stops the
    # workload, unmounts /data and powers off.
    g.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    build.wait_for_shutoff(g.dom, timeout=60)
    log = g.console_log.read_text(errors="replace")
    assert "KBSTOP" in log and "shutdown: poweroff" in log

    # Cleanly unmounted: no journal replay or repair needed.
    fsck = build.fsck_image(g.data_disk, repair_first=False)
    assert fsck.clean, fsck.output
    check = build.check_records(build.read_records(g.data_disk, replay_journal=False))
    assert check.ok and not check.torn_tail, check
    assert check.last_seq >= build.serial_last_seq(g.console_log)

    # Booting the same disk again resumes the sequence where it stopped.
    before = check.count
    g.console_log.unlink()
    g.dom.create()
    build.wait_for_agent(g.dom, timeout=120)
    build.wait_for_progress(g.console_log, before + 5, timeout=60)
    assert f"KBSTART {before}\n" in g.console_log.read_text(errors="replace")
    g.dom.destroy()
    again = build.check_records(build.read_records(g.data_disk))
    assert again.ok and again.count > before
