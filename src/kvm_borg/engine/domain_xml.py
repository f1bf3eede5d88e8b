"""Pure functions over libvirt domain XML: which disks to back up, snapshot XML, overlay names.

Nothing here talks to libvirt; every function takes XML text and returns data or XML text.
"""

from __future__ import annotations

import fnmatch
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from kvm_borg.models import DiskPlan, NetworkHost, NetworkSource, SkippedDisk

OVERLAY_MARK = ".kvm-borg-"
OVERLAY_RE = re.compile(r"\.kvm-borg-\d{8}T\d{6}Z\.qcow2$")
# Disk types never backed up. A `network` disk (nbd, rbd, iscsi, gluster...) is a candidate: the planner keeps it
# only where the bitmap method's pull-mode backup job reads it (kvm_borg.method_choice.network_disk_reason).
SKIPPED_DISK_TYPES = ("volume", "nvme", "vhostuser", "dir")


@dataclass(frozen=True)
class DiskXml:
    """One `<disk>` element as data."""

    target: str
    device: str
    disk_type: str
    source: str | None
    driver_type: str | None
    readonly: bool
    shareable: bool
    mirror: bool
    mirror_ready: bool
    backing_chain: tuple[str, ...]
    network: NetworkSource | None = None  # type network: its protocol, name and hosts


def _network_source(disk: ET.Element) -> NetworkSource | None:
    """Given a `<disk type='network'>`, return its NetworkSource, or None when its `<source>` names no protocol."""
    source = disk.find("source")
    if source is None or not source.get("protocol"):
        return None
    hosts = tuple(NetworkHost(name=h.get("name"), port=h.get("port"), transport=h.get("transport"),
                              socket=h.get("socket")) for h in source.findall("host"))
    return NetworkSource(protocol=source.get("protocol"), name=source.get("name"), hosts=hosts)


def _backing_chain(disk: ET.Element) -> tuple[str, ...]:
    chain = []
    node = disk.find("backingStore")
    while node is not None:
        source = node.find("source")
        if source is None:
            break
        path = source.get("file") or source.get("dev")
        if path:
            chain.append(path)
        node = node.find("backingStore")
    return tuple(chain)


def parse_disks(domain_xml: str) -> list[DiskXml]:
    """Given a domain's XML, return its `<disk>` elements as DiskXml, in document order."""
    root = ET.fromstring(domain_xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        mirror = disk.find("mirror")
        network = _network_source(disk) if disk.get("type") == "network" else None
        disks.append(
            DiskXml(
                target=target.get("dev") if target is not None else "",
                device=disk.get("device", "disk"),
                disk_type=disk.get("type", "file"),
                source=network.label() if network is not None else
                (source.get("file") or source.get("dev")) if source is not None else None,
                driver_type=driver.get("type") if driver is not None else None,
                readonly=disk.find("readonly") is not None,
                shareable=disk.find("shareable") is not None,
                mirror=mirror is not None,
                mirror_ready=mirror is not None and mirror.get("ready") == "yes",
                backing_chain=_backing_chain(disk),
                network=network,
            )
        )
    return disks


def skip_reason(disk: DiskXml) -> str | None:
    """Given a DiskXml, return why it is not backed up (cdrom, volume, shareable...), or None to back it up. A
    network disk is backed up (None) where the method allows: see kvm_borg.method_choice.network_disk_reason."""
    if disk.device != "disk":
        return f"device is a {disk.device}"
    if disk.disk_type in SKIPPED_DISK_TYPES:
        return f"{disk.disk_type} disk"
    if disk.disk_type == "network" and disk.network is None:
        return "network disk without a protocol"
    if disk.disk_type not in ("file", "block", "network"):
        return f"unsupported disk type {disk.disk_type}"
    if disk.shareable:
        return "shareable disk"
    if disk.readonly:
        return "read-only disk"
    if not disk.source:
        return "no source"
    return None


def choose_disks(
    domain_xml: str, excluded_targets: list[str] | tuple[str, ...] = ()
) -> tuple[list[DiskPlan], list[SkippedDisk]]:
    """Given a domain's XML and targets to exclude, return (disks to back up, skipped disks with reasons). A
    network disk is among the disks to back up, with source_type "network" and its NetworkSource."""
    chosen, skipped = [], []
    for disk in parse_disks(domain_xml):
        reason = skip_reason(disk)
        if reason is None and disk.target in excluded_targets:
            reason = "excluded by configuration"
        if reason:
            skipped.append(SkippedDisk(disk.target, reason))
            continue
        chosen.append(
            DiskPlan(
                target=disk.target,
                source=disk.source,
                source_type=disk.disk_type,
                driver_type=disk.driver_type or "raw",
                backing_chain=disk.backing_chain,
                network=disk.network,
            )
        )
    return chosen, skipped


def domain_selected(name: str, include: list[str], exclude: list[str]) -> bool:
    """Given a domain name and include/exclude globs, return whether `--all` backs it up."""
    return any(fnmatch.fnmatchcase(name, g) for g in include) and not any(
        fnmatch.fnmatchcase(name, g) for g in exclude
    )


def is_overlay_path(path: str | None) -> bool:
    """Given a disk source path, return whether it is an overlay kvm-borg creates."""
    return bool(path) and bool(OVERLAY_RE.search(path))


def overlay_path(source: str, source_type: str, overlay_dir: str | None, fallback_dir: str, timestamp: str) -> str:
    """Given a disk's source and the overlay settings, return the overlay file path for this run.

    Next to the image by default; in `overlay_dir` when set; block devices (no directory of
    their own to write to) use `fallback_dir` unless `overlay_dir` is set."""
    base = os.path.basename(source)
    if overlay_dir:
        directory = overlay_dir
    elif source_type == "block":
        directory = fallback_dir
    else:
        directory = os.path.dirname(source)
    return os.path.join(directory, f"{base}{OVERLAY_MARK}{timestamp}.qcow2")


def snapshot_xml(name: str, all_targets: list[str], overlays: dict[str, str]) -> str:
    """Given a snapshot name, every disk target of the domain and {target: overlay}, return snapshot XML.

    Targets with an overlay are snapshotted externally to it; every other disk is `snapshot='no'`,
    so one atomic call freezes exactly the chosen disks."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = "kvm-borg backup overlay (temporary)"
    disks = ET.SubElement(root, "disks")
    for target in all_targets:
        disk = ET.SubElement(disks, "disk", name=target)
        if target in overlays:
            disk.set("snapshot", "external")
            disk.set("type", "file")
            ET.SubElement(disk, "driver", type="qcow2")
            ET.SubElement(disk, "source", file=overlays[target])
        else:
            disk.set("snapshot", "no")
    return ET.tostring(root, encoding="unicode")


def disk_targets(domain_xml: str) -> list[str]:
    """Given a domain's XML, return every disk target in document order."""
    return [d.target for d in parse_disks(domain_xml) if d.target]


def sources_by_target(domain_xml: str) -> dict[str, str | None]:
    """Given a domain's XML, return {target: source path}."""
    return {d.target: d.source for d in parse_disks(domain_xml)}


def rewrite_disk_source(domain_xml: str, target: str, source: str, source_type: str, driver_type: str) -> str:
    """Given a domain's XML, return it with disk `target` pointing at `source` again.

    Sets the disk type, the `<source file|dev>`, the `<driver type>` and drops `<backingStore>`:
    what offline recovery needs after an overlay was committed into its base."""
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        if tgt is None or tgt.get("dev") != target:
            continue
        disk.set("type", source_type)
        for child in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(child)
        src = ET.Element("source", {"dev" if source_type == "block" else "file": source})
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", name="qemu")
        driver.set("type", driver_type)
        index = list(disk).index(driver) + 1
        disk.insert(index, src)
        return ET.tostring(root, encoding="unicode")
    raise ValueError(f"no disk with target {target}")


def firmware_files(domain_xml: str) -> dict[str, str | None]:
    """Given a domain's XML, return {'loader', 'loader_type', 'nvram'} paths (None when absent)."""
    root = ET.fromstring(domain_xml)
    loader = root.find("./os/loader")
    nvram = root.find("./os/nvram")
    return {
        "loader": loader.text.strip() if loader is not None and loader.text else None,
        "loader_type": loader.get("type") if loader is not None else None,
        "nvram": nvram.text.strip() if nvram is not None and nvram.text else None,
    }


def has_guest_agent_channel(domain_xml: str) -> bool:
    """Given a domain's XML, return whether it has the qemu guest agent channel."""
    root = ET.fromstring(domain_xml)
    return any(
        t.get("name") == "org.qemu.guest_agent.0" for t in root.findall("./devices/channel/target")
    )


NBD_DEFAULT_PORT = "10809"


def network_image_url(network: NetworkSource) -> str | None:
    """Given a network disk's NetworkSource, return the URL qemu-img opens it by (to read a qcow2 disk's
    compat level), or None where kvm-borg does not build one: an NBD export over TCP
    (`nbd://HOST:PORT/NAME`) or a unix socket (`nbd+unix:///NAME?socket=PATH`); other protocols need
    credentials or configuration kvm-borg does not hold (rbd, iscsi...)."""
    if network.protocol != "nbd" or not network.hosts:
        return None
    host = network.hosts[0]
    name = network.name or ""
    if host.transport == "unix":
        return f"nbd+unix:///{name}?socket={host.socket}" if host.socket else None
    if not host.name or host.transport not in (None, "tcp"):
        return None
    server = f"[{host.name}]" if ":" in host.name else host.name
    return f"nbd://{server}:{host.port or NBD_DEFAULT_PORT}/{name}"
