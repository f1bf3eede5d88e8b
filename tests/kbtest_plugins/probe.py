"""A test plugin driven by environment variables, to observe and perturb a real backup run.

- KBTEST_REFERENCE_DIR: right after the snapshot, copy each frozen disk's guest view to
  DIR/<target>.raw (the reference "content at snapshot time").
- KBTEST_WRITE_AFTER_SNAPSHOT=1: right after the snapshot, write 0xEE at 8 MiB (1 MiB) into each
  disk through the running VM (lands on the overlay: must NOT be in the archive, MUST be in the
  image after the commit).
- KBTEST_PAUSE_FILE / KBTEST_PAUSE_SECONDS: after the snapshot, touch the file and sleep, so a
  test can signal the process while the domain runs on its overlays.
- KBTEST_EVENTS_FILE: append one JSON line per hook call (hook name, domain).
"""

import json
import os
import subprocess
import time

import libvirt
import libvirt_qemu

from kvm_borg.hookspecs import hookimpl

AFTER_SNAPSHOT_PATTERN = 0xEE
AFTER_SNAPSHOT_OFFSET = 8 << 20
AFTER_SNAPSHOT_LENGTH = 1 << 20


def _record(hook, **fields):
    path = os.environ.get("KBTEST_EVENTS_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"hook": hook, **fields}, default=str) + "\n")


def _alias(dom, target):
    import xml.etree.ElementTree as ET

    for disk in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk"):
        if disk.find("target").get("dev") == target:
            return disk.find("alias").get("name")
    raise KeyError(target)


@hookimpl
def kvm_borg_before_snapshot(domain, disks, quiesce):
    _record("before_snapshot", domain=domain, disks=[d.target for d in disks], quiesce=quiesce)


@hookimpl
def kvm_borg_after_snapshot(domain, disks, quiesced, seconds):
    _record("after_snapshot", domain=domain, disks=[d.target for d in disks], quiesced=quiesced)
    reference_dir = os.environ.get("KBTEST_REFERENCE_DIR")
    if reference_dir:
        for disk in disks:
            subprocess.run(["qemu-img", "convert", "-U", "-f", disk.driver_type, "-O", "raw", disk.path,
                            os.path.join(reference_dir, f"{disk.target}.raw")], check=True)
    if os.environ.get("KBTEST_WRITE_AFTER_SNAPSHOT"):
        conn = libvirt.open("qemu:///system")
        dom = conn.lookupByName(domain)
        for disk in disks:
            command = (f"qemu-io -d /machine/peripheral/{_alias(dom, disk.target)}/virtio-backend "
                       f"\"write -P {AFTER_SNAPSHOT_PATTERN:#x} {AFTER_SNAPSHOT_OFFSET} {AFTER_SNAPSHOT_LENGTH}\"")
            libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        conn.close()
    pause_file = os.environ.get("KBTEST_PAUSE_FILE")
    if pause_file:
        with open(pause_file, "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(float(os.environ.get("KBTEST_PAUSE_SECONDS", "60")))


@hookimpl
def kvm_borg_after_store(domain, repository, result):
    _record("after_store", domain=domain, repository=repository, ok=result.ok, archive=result.archive)


@hookimpl
def kvm_borg_before_commit(domain, disks):
    _record("before_commit", domain=domain)


@hookimpl
def kvm_borg_after_commit(domain, disks, seconds):
    _record("after_commit", domain=domain)


@hookimpl
def kvm_borg_on_error(domain, stage, error):
    _record("on_error", domain=domain, stage=stage, error=str(error))


@hookimpl
def kvm_borg_backup_finished(summary):
    _record("backup_finished", exit_code=summary.exit_code)
