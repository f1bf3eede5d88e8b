"""The live restore's decisions: which disks it can serve from the archive, where the local images go,
the qemu-img argv that creates them, the domain XML that runs on them, and who reads a repository.

A live restore runs the restored domain on local qcow2 images whose backing files are the archived
images, exposed read-only (kvm_borg.pipeline.archive_mount), and pulls the data into the local images
while the guest runs (kvm_borg.pipeline.live_restore). Pure: no I/O.
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET

from kvm_borg import archive_meta
from kvm_borg.errors import UsageError
from kvm_borg.restore_plan import RestoreDisk

SOURCE_NAME = "live-restore"  # the journal entries' source
LIVE_FORMATS = frozenset({"raw", "qcow2"})  # backing formats QEMU opens with every layer named


def check_live_disk(disk: RestoreDisk) -> str:
    """Given a planned RestoreDisk, return the format its archived image is opened with as a backing file
    (raw for a segmented disk: the segment view shows the guest content); a UsageError if the live restore
    cannot serve it (a backing chain in the archive, a format other than raw or qcow2)."""
    if disk.segmented:
        return "raw"
    if disk.backing:
        raise UsageError(f"disk {disk.target} has backing files in the archive: restore it without --live")
    fmt = archive_meta.check_format(disk.format)
    if fmt not in LIVE_FORMATS:
        raise UsageError(f"disk {disk.target} is a {fmt} image: --live serves raw and qcow2 images only")
    return fmt


def local_image(destination: str) -> str:
    """Given a restore destination (NAME-TARGET.FORMAT), return the live restore's local qcow2 image beside it."""
    stem, _ext = posixpath.splitext(destination)
    return stem + ".qcow2"


def overlay_argv(local: str, backing: str, backing_format: str, virtual_size: int) -> list[str]:
    """Given the local image, its backing file (exposed archive image), that file's format and the disk's
    virtual size, return the `qemu-img create` argv of the local qcow2 (-u: the backing is not opened,
    the size is given)."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", backing_format, "-b", backing, local,
            str(virtual_size)]


# A local qcow2 image of 64 KiB clusters holds at most every cluster of the disk, plus 8 bytes of L2 table
# and 2 of refcount per cluster (1/6554 of the size: 1/4096 covers it) and the header, L1 and refcount
# tables (1 MiB covers a disk of some TiB).
QCOW2_METADATA_SHARE = 4096
QCOW2_FIXED_BYTES = 1 << 20


def local_image_bound(virtual_size: int) -> int:
    """Given a disk's virtual size (meta.json's, already checked by archive_meta.check_size), return the most
    bytes its local qcow2 image takes once the pull is done (every cluster written, with its metadata)."""
    return virtual_size + virtual_size // QCOW2_METADATA_SHARE + QCOW2_FIXED_BYTES


def space_needed(images: dict[str, int], filesystem_of) -> dict[object, tuple[str, int]]:
    """Given {local image path: disk virtual size} and `filesystem_of(directory) -> (key, shown directory)`
    naming the file system a directory is on, return {key: (shown directory, bytes the images on that file
    system need at most once pulled)}."""
    needs: dict[object, tuple[str, int]] = {}
    for path, virtual_size in sorted(images.items()):
        key, shown = filesystem_of(posixpath.dirname(path))
        previous = needs.get(key, (shown, 0))
        needs[key] = (previous[0], previous[1] + local_image_bound(virtual_size))
    return needs


def space_refusal(needs: dict[object, tuple[str, int]], free: dict[object, int]) -> str | None:
    """Given space_needed's answer and {file system key: bytes free}, return the refusal of the first file
    system that lacks room (a live restore that runs out of space mid-pull pauses its guest), or None."""
    for key, (shown, needed) in needs.items():
        if free[key] < needed:
            return (f"not enough free space in {shown} for a live restore: its pulled disks need up to {needed} "
                    f"bytes ({needed / 2**30:.2f} GiB), {free[key]} bytes ({free[key] / 2**30:.2f} GiB) are free; "
                    "make room or choose another --target-dir")
    return None


def _disk_target(disk: ET.Element) -> str | None:
    target = disk.find("target")
    return target.get("dev") if target is not None else None


def live_domain_xml(domain_xml: str, backings: dict[str, tuple[str, str]]) -> str:
    """Given the restored domain's XML (disks already on their local qcow2 images) and {target: (backing file,
    format)}, return it with each of those disks' backing chain written out (the archived image, then
    nothing: no path in an image header is followed), QEMU's DAC label left off the read-only archive, and
    read and write errors pausing the guest (`stop`) instead of reaching it."""
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        target = _disk_target(disk)
        if target not in backings:
            continue
        path, fmt = backings[target]
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", name="qemu", type="qcow2")
            disk.insert(0, driver)
        driver.set("error_policy", "stop")
        driver.set("rerror_policy", "stop")
        for old in disk.findall("backingStore"):
            disk.remove(old)
        store = ET.Element("backingStore", type="file")
        ET.SubElement(store, "format", type=fmt)
        source = ET.SubElement(store, "source", file=path)
        ET.SubElement(source, "seclabel", model="dac", relabel="no")
        ET.SubElement(store, "backingStore")
        source_node = disk.find("source")
        position = list(disk).index(source_node) + 1 if source_node is not None else len(disk)
        disk.insert(position, store)
    return ET.tostring(root, encoding="unicode")


def targets_with_backing(live_xml: str) -> set[str]:
    """Given a running domain's live XML, return the disk targets that still have a backing file."""
    result = set()
    for disk in ET.fromstring(live_xml).findall("./devices/disk"):
        store = disk.find("backingStore")
        if store is not None and store.find("source") is not None:
            result.add(_disk_target(disk))
    return result


def backing_sources(domain_xml: str) -> dict[str, str]:
    """Given a domain XML, return {disk target: the file of its first backing store} for the disks that have one."""
    result = {}
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        source = disk.find("backingStore/source")
        if source is not None:
            result[_disk_target(disk)] = source.get("file") or source.get("dev") or repr(dict(source.attrib))
    return result


def without_backing(domain_xml: str, targets: set[str] | frozenset[str]) -> str:
    """Given a domain XML and disk targets, return it with those disks' backing stores removed (their images
    were flattened offline)."""
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        if _disk_target(disk) in targets:
            for store in disk.findall("backingStore"):
                disk.remove(store)
    return ET.tostring(root, encoding="unicode")


def readers_of(entries, repository: str) -> list:
    """Given journal Entries and a repository name, return the unfinished live restores that read it."""
    return [e for e in entries if e.source == SOURCE_NAME and e.extra.get("repository") == repository]


def parse_dac_label(label: str) -> tuple[int, int] | None:
    """Given libvirt's DAC base label (`+64055:+108`), return (uid, gid); None if it is not numeric."""
    try:
        uid, gid = (int(part.lstrip("+")) for part in label.strip().split(":"))
    except ValueError:
        return None
    return uid, gid
