"""Block-device disks (LVM-like, here a loop device) and a shut-off domain that starts mid-backup."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from harness import DiskSpec, run_cli, virt_type
from harness.images import create_image, verify_fill
from support import (
    archived_meta,
    assert_back_on_own_images,
    borg_archives,
    cli_env,
    extract_archive,
    journal_entries,
    overlay_files,
    write_config,
)
from test_failures import _start_paused_backup

MiB = 1 << 20


@pytest.fixture
def loop_device(image_dir):
    backing = image_dir / "lv.img"
    create_image(backing, "raw", 32, "pattern", 7)
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                            check=True).stdout.strip()
    yield device, backing
    subprocess.run(["losetup", "-d", device], capture_output=True)


def test_block_device_disk_is_read_as_content_and_overlaid_in_state_dir(domain_factory, image_dir, tmp_path,
                                                                       loop_device, libvirt_conn):
    device, backing = loop_device
    name = domain_factory.domain_name("block disk")
    xml = f"""<domain type='{virt_type(libvirt_conn)}'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/><source dev='{device}'/>
      <target dev='vda' bus='virtio'/></disk></devices></domain>"""
    dom = libvirt_conn.defineXML(xml)
    dom.create()
    state = image_dir / "kb" / "state"
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", name, "--json", config=config,
                   env=cli_env(KBTEST_EVENTS_FILE=tmp_path / "events.jsonl"))
    assert proc.returncode == 0, proc.stderr
    archive = json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]
    extracted = extract_archive(tmp_path / "repo", archive, tmp_path / "x")
    meta = archived_meta(extracted)
    [disk] = meta["disks"]
    assert disk["block_device"] is True and disk["archive_path"] == device.lstrip("/")
    assert disk["source_type"] == "block" and disk["virtual_size"] == 32 * MiB
    stored = extracted / disk["archive_path"]
    assert stored.is_file() and stored.stat().st_size == 32 * MiB  # content, not a device node
    assert verify_fill(stored, "raw", 32, "pattern", 7)
    # Back on the block device, live and persistent, with the overlay (in state_dir) gone.
    from harness import inactive_sources, live_sources

    assert live_sources(dom) == {"vda": device} and inactive_sources(dom) == {"vda": device}
    assert "type='block'" in dom.XMLDesc(0).split("<disk", 1)[1].split(">", 1)[0]
    assert overlay_files(state) == [] and journal_entries(state) == []


def test_shut_off_domain_started_during_backup_gets_a_warning_and_a_live_backup(domain_factory, image_dir,
                                                                                tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], running=False)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    pause = tmp_path / "paused"
    proc = _start_paused_backup(config, domain, pause, seconds=3)
    domain.start()  # someone starts the VM while its images are read
    pause.unlink()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err  # success with a warning
    assert "may be inconsistent" in out + err
    archives = borg_archives(tmp_path / "repo")
    assert len(archives) == 2  # the offline one (flagged) and the live one taken right after
    metas = [archived_meta(extract_archive(tmp_path / "repo", a, tmp_path / a)) for a in sorted(archives)]
    assert [m["consistency"] for m in metas] == ["offline", "crash-consistent"]
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
    assert domain.is_active()
