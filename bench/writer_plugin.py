"""A kvm-borg plugin (config `plugins: [bench.writer_plugin]`) that writes into a disk while it is frozen.

With KVM_BORG_BENCH_WRITE_MIB > 0, right after the snapshot (kvm_borg_after_snapshot) it writes
that many MiB through the running VM's block layer (HMP qemu-io), i.e. into the overlay, as a
guest would while the backup runs; the blockcommit afterwards has that much to merge back.
KVM_BORG_BENCH_WRITE_OFFSET (bytes) says where, KVM_BORG_BENCH_WRITE_PATTERN names the file
the data comes from, KVM_BORG_BENCH_WRITE_LOG a file that gets one JSON line {mib, seconds}.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import libvirt

from kvm_borg.hookspecs import hookimpl

from bench.common import MiB, write_extents


@hookimpl
def kvm_borg_after_snapshot(domain, settings):
    mib = int(os.environ.get("KVM_BORG_BENCH_WRITE_MIB", "0"))
    if mib <= 0:
        return
    started = time.monotonic()
    conn = libvirt.open(getattr(settings, "libvirt_uri", None) or "qemu:///system")
    try:
        dom = conn.lookupByName(domain)
        offset = int(os.environ.get("KVM_BORG_BENCH_WRITE_OFFSET", "0"))
        write_extents(dom, [(offset, mib * MiB)], [Path(os.environ["KVM_BORG_BENCH_WRITE_PATTERN"])])
    finally:
        conn.close()
    log = os.environ.get("KVM_BORG_BENCH_WRITE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"mib": mib, "seconds": time.monotonic() - started}) + "\n")
