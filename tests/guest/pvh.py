"""The guest kernel as an uncompressed ELF for QEMU's PVH entry: the same kernel, booted without its decompressor.

Debian's `vmlinuz` is a bzImage whose payload is xz-compressed; under TCG the boot stub's xz
decompression of ~64 MiB is most of the wait before the kernel prints its first line (measured here:
"Linux version" at 18 s after `dom.create()` with the bzImage, 2-8 s with the ELF, load average 4-6).
The kernel carries a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), so QEMU's `-kernel` (libvirt's
`<kernel>`) loads the ELF `vmlinux` straight into guest memory and jumps there; the initramfs and the
command line are unchanged. A kernel without an xz payload or without that note is returned as it is.

Kept apart from build.py on purpose: build.py's text is its artifacts' cache key.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import lzma
import os
import struct
from pathlib import Path

from guest.build import GuestArtifacts

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


def has_pvh_entry(elf: bytes) -> bool:
    """Given the bytes of an ELF64 little-endian image, return True when a PT_NOTE segment holds a "Xen"
    note of type XEN_ELFNOTE_PHYS32_ENTRY (QEMU's PVH boot needs it)."""
    if elf[:4] != ELF_MAGIC or elf[4] != 2 or elf[5] != 1:  # ELFCLASS64, little-endian
        return False
    try:
        phoff, = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
        for i in range(phnum):
            p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
            if p_type != PT_NOTE:
                continue
            pos, end = offset, offset + filesz
            while pos + 12 <= end:
                namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
                name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
                if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
                pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    except struct.error:  # truncated: not a bootable ELF
        return False
    return False


def decompressed_kernel(bzimage: bytes) -> bytes | None:
    """Given a bzImage, return its xz-compressed ELF payload decompressed, or None when it has none."""
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    return elf if elf[:4] == ELF_MAGIC else None


def pvh_artifacts(artifacts: GuestArtifacts) -> GuestArtifacts:
    """Given the built artifacts, return them with `kernel` the PVH-bootable ELF beside the bzImage
    (vmlinux-<hash of vmlinuz>, made once, atomically, under the build's lock), or unchanged when the
    kernel has no xz payload or no PVH entry note."""
    kernel = artifacts.kernel
    data = kernel.read_bytes()
    target = kernel.with_name(f"vmlinux-{hashlib.sha256(data).hexdigest()[:16]}")
    unusable = target.with_name(target.name + ".not-pvh")
    if not target.is_file() and not unusable.exists():
        with open(kernel.with_name(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.is_file() and not unusable.exists():
                elf = decompressed_kernel(data)
                if elf is None or not has_pvh_entry(elf):
                    unusable.touch()
                else:
                    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
                    tmp.write_bytes(elf)
                    tmp.chmod(0o644)
                    os.replace(tmp, target)
    if not target.is_file():
        return artifacts
    return dataclasses.replace(artifacts, kernel=Path(target),
                               manifest={**artifacts.manifest, "boot": "pvh", "bzimage": str(kernel)})
