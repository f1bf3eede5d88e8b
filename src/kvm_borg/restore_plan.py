"""What a restore will write and define: pure functions, no I/O.

Given an archive's `meta.json`, the paths the archive holds and the user's options, decide
where every file goes (`plan_restore`) and how the domain XML changes (`rewrite_domain_xml`).
Everything that comes from an archive is untrusted (checked by `kvm_borg.archive_meta`), and
no destination comes from it: destinations are the local definition's images, --target-dir,
or libvirt's image, NVRAM and swtpm directories. A violation is a UsageError naming the value.
"""

from __future__ import annotations

import json
import posixpath
import random
import re
import uuid as uuid_module
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from kvm_borg.archive_meta import (
    check_archive_path,
    check_domain_name,
    check_meta,
    check_relative_path,
    check_segments,
    check_target,
    check_uuid,
)
from kvm_borg.errors import UsageError

META_SUFFIX = "/meta.json"
#: libvirt's own directories: restored files go nowhere else unless the user names a directory.
IMAGE_DIR = "/var/lib/libvirt/images"
NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
TPM_STATE_ROOT = "/var/lib/libvirt/swtpm"
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_file_name(name: str) -> str:
    """Given a domain name, return a string safe as part of a file name (no "/", no leading dot)."""
    safe = _NAME_UNSAFE.sub("_", name).lstrip(".")
    return safe or "domain"


# --- finding and reading meta.json -------------------------------------------------------------


def meta_candidates(paths: list[str]) -> list[str]:
    """Given an archive's paths, return those that may be kvm-borg's meta.json (ending in /meta.json)."""
    return [p for p in paths if ("/" + p.lstrip("/")).endswith(META_SUFFIX)]


def parse_meta(text: str) -> dict | None:
    """Given a file's text, return it as kvm-borg meta.json, or None if it is not one (not JSON, no marker)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not data.get("kvm_borg"):
        return None
    if not isinstance(data.get("disks"), list) or not isinstance(data.get("domain"), dict):
        return None
    return data


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreFile:
    """One stored file and where it goes. Owner and mode are chosen on this host, never read from the archive:
    a new file is root's with `mode`; a file replaced in place keeps its local owner (see kvm_borg.restore_files)."""

    archive_path: str
    destination: str
    mode: int = 0o600
    owner: str | None = None  # a local user name; None: root
    group: str | None = None


@dataclass(frozen=True)
class RestoreDisk:
    """One disk: its image (and backing files, top first below it) and its format.

    A disk of layout "segments" is stored as a directory (`image.archive_path`) of `segment_count`
    segment files of `segment_size` bytes holding the raw guest content; it has no backing files and is
    restored flat in `format` (kvm_borg.pipeline.segments_read)."""

    target: str
    format: str
    image: RestoreFile
    virtual_size: int
    backing: tuple[tuple[RestoreFile, str | None], ...] = ()  # (file, format) of each backing layer, top first
    layout: str = "image"  # "image" | "segments"
    segment_size: int = 0
    segment_count: int = 0

    @property
    def segmented(self) -> bool:
        """Whether the disk is stored as segment files (layout "segments")."""
        return self.layout == "segments"


@dataclass(frozen=True)
class LocalDisk:
    """A disk of the domain's definition on THIS host: its source and whether it is a block device."""

    source: str | None
    block: bool = False


@dataclass
class RestorePlan:
    """Everything a restore writes: disks, NVRAM, TPM state, the domain XML; and what it reports."""

    domain: str  # the name the restored domain gets
    uuid: str  # the UUID the restored domain gets
    original_name: str
    original_uuid: str
    disks: list[RestoreDisk]
    nvram: RestoreFile | None
    tpm_files: list[RestoreFile]
    tpm_dir: str | None
    xml_path: str | None
    warnings: list[str] = field(default_factory=list)
    in_place: bool = False  # onto the local definition's own images

    def destinations(self) -> list[str]:
        """Every host path the plan writes (images, backing files, NVRAM, TPM files, XML)."""
        paths = []
        for disk in self.disks:
            paths.append(disk.image.destination)
            paths.extend(f.destination for f, _fmt in disk.backing)
        if self.nvram:
            paths.append(self.nvram.destination)
        paths.extend(f.destination for f in self.tpm_files)
        if self.xml_path:
            paths.append(self.xml_path)
        return paths


def check_target_dir(path: str) -> str:
    """Given --target-dir (absolute), return it normalized; a relative one is a UsageError."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise UsageError(f"--target-dir must be an absolute path: {path!r}")
    return posixpath.normpath(path)


def plan_restore(
    meta: dict,
    archive_paths: set[str] | frozenset[str],
    *,
    target_dir: str | None = None,
    new_name: str | None = None,
    new_uuid: str | None = None,
    disks: list[str] | tuple[str, ...] = (),
    with_xml: bool = True,
    local_disks: dict[str, LocalDisk] | None = None,
    image_dir: str = IMAGE_DIR,
    archive_types: dict[str, str] | None = None,
    backing_formats_required: bool = True,
) -> RestorePlan:
    """Given meta.json, the archive's paths and the options, return the RestorePlan.

    Destinations come from this host, never from a path in the archive:
    - `local_disks` (the local definition of the archived domain, by target; None when it is not
      defined here) without `target_dir` and `new_name`: an in-place restore onto those sources;
    - otherwise `target_dir`, or the directory of the local disk for a copy (`new_name`) of a
      domain defined here, or libvirt's `image_dir`; files are named `NAME-TARGET.FORMAT`
      (backing layers `NAME-TARGET-backingN.FORMAT`);
    - NVRAM: NVRAM_DIR/NAME_VARS.fd; TPM state: TPM_STATE_ROOT/UUID/RELATIVE.
    With `archive_types` ({archive path: kind}), every file read must be a regular file ("file").
    meta.json is checked whole first (archive_meta.check_meta). A violation is a UsageError."""
    meta = check_meta(meta)
    if target_dir is not None:
        target_dir = check_target_dir(target_dir)
    if new_name is not None:
        check_domain_name(new_name, "invalid --name")
    original_name = meta["domain"]["name"]
    original_uuid = check_uuid(meta["domain"]["uuid"])
    name = new_name if new_name is not None else original_name
    if new_name is not None:
        domain_uuid = check_uuid(new_uuid, "UUID") if new_uuid else str(uuid_module.uuid4())
    else:
        domain_uuid = original_uuid
    in_place = local_disks is not None and target_dir is None and new_name is None
    stem = safe_file_name(name)
    warnings: list[str] = []

    def present(path: str, what: str, kind: str = "file") -> str:
        checked = check_archive_path(path, what)
        if checked not in archive_paths:
            raise UsageError(f"archive lacks {what} {checked} that its meta.json names")
        if archive_types is not None and archive_types.get(checked) != kind:
            expected = "a regular file" if kind == "file" else "a directory"
            raise UsageError(f"archive holds {what} {checked} as a {archive_types.get(checked) or 'unknown'}, "
                             f"not {expected}; refused")
        return checked

    def directory_for(target: str) -> str:
        if target_dir is not None:
            return target_dir
        local = (local_disks or {}).get(target)
        if local is not None and local.source and not local.block:
            return posixpath.dirname(local.source)
        return image_dir

    archived = {entry["target"]: entry for entry in meta["disks"]}
    unknown = [t for t in disks if t not in archived]
    if unknown:
        raise UsageError(f"archive has no disk {', '.join(map(str, unknown))} (it has {', '.join(archived) or 'none'})")
    chosen = [t for t in archived if not disks or t in disks]

    restore_disks = []
    for target in chosen:
        entry = archived[target]
        fmt = entry["format"]
        network = entry.get("network")
        if in_place and network is not None and not (local_disks.get(target) and local_disks[target].source):
            destination = posixpath.join(image_dir, f"{stem}-{target}.{fmt}")  # the network volume stays as it is
        elif in_place:
            local = local_disks.get(target)
            if local is None or not local.source:
                raise UsageError(f"disk {target} of the archive is not a file disk of the local domain {name!r}; "
                                 "give --target-dir or --name")
            if local.block:
                raise UsageError(f"disk {target} of domain {name!r} is the block device {local.source}: give "
                                 f"--target-dir to restore it as a file, or --disk {target} --to {local.source} "
                                 "--overwrite to write into the device")
            destination = local.source
        else:
            destination = posixpath.join(directory_for(target), f"{stem}-{target}.{fmt}")
        if network is not None:
            warnings.append(network_origin_warning(target, network, destination, with_xml and not disks, fmt))
        segments = check_segments(entry, f"disk {target}")
        if segments is not None:
            image = RestoreFile(present(entry["archive_path"], f"segment directory of disk {target}", "dir"),
                                destination)
            restore_disks.append(RestoreDisk(target, fmt, image, entry["virtual_size"], layout="segments",
                                             segment_size=segments["size"], segment_count=segments["count"]))
            continue
        image = RestoreFile(present(entry["archive_path"], f"image of disk {target}"), destination)
        backing = []
        for index, layer in enumerate(entry.get("backing_chain") or [], start=1):
            layer_format = layer.get("format")
            if layer_format is None and backing_formats_required:
                raise UsageError(f"archive records no format for backing file {index} of disk {target} (made by an "
                                 f"older kvm-borg); restore the top image only with --disk {target} --to FILE")
            layer_name = f"{stem}-{target}-backing{index}.{layer_format or 'img'}"
            backing.append((
                RestoreFile(present(layer["archive_path"], f"backing file of disk {target}"),
                            posixpath.join(posixpath.dirname(destination), layer_name)),
                layer_format,
            ))
        restore_disks.append(RestoreDisk(target, fmt, image, entry["virtual_size"], tuple(backing)))

    nvram = None
    firmware = meta.get("firmware") or {}
    files = meta["files"]
    if firmware.get("nvram") and not disks:
        if files.get("nvram"):
            nvram = RestoreFile(present(files["nvram"], "NVRAM file"), posixpath.join(NVRAM_DIR, f"{stem}_VARS.fd"))
        else:
            warnings.append(f"the archive has no NVRAM file (at backup time: "
                            f"{firmware.get('nvram_missing') or 'not captured'}); libvirt will start from the template")

    tpm_files: list[RestoreFile] = []
    tpm_dir = None
    tpm = meta.get("tpm") or {}
    if tpm and not disks:
        tpm_dir = posixpath.join(TPM_STATE_ROOT, domain_uuid)
        entries = files.get("tpm_state") or []
        if not entries:
            warnings.append(f"the archive has no TPM state ({tpm.get('missing') or 'not captured'}); "
                            "the restored domain starts with an empty TPM")
        for item in entries:
            relative = check_relative_path(item["relative"], "TPM state file")
            tpm_files.append(RestoreFile(present(item["archive_path"], "TPM state file"),
                                         posixpath.join(tpm_dir, relative)))

    xml_path = None
    if with_xml and not disks:
        first = restore_disks[0].image.destination if restore_disks else None
        directory = target_dir or (posixpath.dirname(first) if first else image_dir)
        xml_path = posixpath.join(directory, f"{stem}.xml")

    plan = RestorePlan(name, domain_uuid, original_name, original_uuid, restore_disks, nvram, tpm_files,
                       tpm_dir, xml_path, warnings, in_place)
    seen: set[str] = set()
    for path in plan.destinations():
        if path in seen:
            raise UsageError(f"two restored files would both be written to {path}")
        seen.add(path)
    return plan


def network_label(network: dict) -> str:
    """Given a disk's checked `network` entry from meta.json, return it as one line ("nbd://10.0.0.1:10809/vm")."""
    hosts = ",".join(str(h.get("socket") or (h.get("name") or "") + (f":{h['port']}" if h.get("port") else ""))
                     for h in network.get("hosts") or [])
    return f"{network['protocol']}://{hosts}/{network.get('name') or ''}"


def network_origin_warning(target: str, network: dict, destination: str, with_xml: bool, fmt: str = "raw") -> str:
    """Given a restored disk that was a network disk at backup time, its checked `network` entry, where it is
    written, whether a domain XML is written too and its format, return the warning that says so: the
    network volume is not touched (kvm-borg never connects to the hosts an archive names); writing it back
    is the sysadmin's step (a raw disk: `--disk TARGET --to /dev/...` onto the volume mapped as a block
    device; qcow2: `qemu-img convert` of the restored file; docs/operations.md)."""
    xml = "; the restored domain's XML points at that file" if with_xml else ""
    back = (f"map it as a block device and use --disk {target} --to DEVICE --overwrite" if fmt == "raw"
            else "qemu-img convert the restored file onto it")
    return (f"disk {target} was the network disk {network_label(network)} at backup time: restored to the local "
            f"file {destination}{xml}; the network volume was not touched (to write it back, {back})")


# --- the domain XML ----------------------------------------------------------------------------


def random_mac(rng: random.Random | None = None) -> str:
    """Return a random MAC address in QEMU's locally administered range 52:54:00:xx:xx:xx."""
    rng = rng or random.SystemRandom()
    return "52:54:00:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))


def _disk_target(disk: ET.Element) -> str | None:
    target = disk.find("target")
    return target.get("dev") if target is not None else None


def rewrite_domain_xml(
    domain_xml: str,
    *,
    disks: dict[str, tuple[str, str]],
    nvram: str | None = None,
    name: str | None = None,
    uuid: str | None = None,
    new_macs: bool = False,
    drop_disks: tuple[str, ...] | list[str] = (),
    isolate: bool = False,
    scratch_dir: str | None = None,
    rng: random.Random | None = None,
) -> str:
    """Given the archived domain XML, return it rewritten for the restored copy.

    `disks` maps each restored target to (image path, format): the disk becomes a file disk on
    that image, with no backing store left from the backup's overlay. `nvram` points `<os><nvram>`
    at the restored vars file. `name`/`uuid` rename it; `new_macs` gives every interface a fresh
    MAC. `drop_disks` removes disks. `isolate` (the verify drill) removes network interfaces and
    host devices and sends file-backed serial/console output into `scratch_dir`."""
    root = ET.fromstring(domain_xml)
    if name is not None:
        root.find("name").text = name
    if uuid is not None:
        node = root.find("uuid")
        if node is None:
            node = ET.Element("uuid")
            root.insert(list(root).index(root.find("name")) + 1, node)
        node.text = uuid
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for disk in devices.findall("disk"):
        target = _disk_target(disk)
        if target in drop_disks:
            devices.remove(disk)
            continue
        if target not in disks:
            continue
        path, fmt = disks[target]
        disk.set("type", "file")
        for child in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(child)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", name="qemu")
            disk.insert(0, driver)
        driver.set("type", fmt)
        disk.insert(list(disk).index(driver) + 1, ET.Element("source", file=path))
    if nvram is not None:
        os_node = root.find("os")
        if os_node is None:
            raise UsageError("the archived domain XML has no <os> element for the NVRAM")
        node = os_node.find("nvram")
        if node is None:
            node = ET.SubElement(os_node, "nvram")
        node.text = nvram
    if new_macs:
        for interface in devices.findall("interface"):
            mac = interface.find("mac")
            if mac is None:
                mac = ET.Element("mac")
                interface.insert(0, mac)
            mac.set("address", random_mac(rng))
    if isolate:
        for tag in ("interface", "hostdev", "redirdev", "smartcard"):
            for node in devices.findall(tag):
                devices.remove(node)
        for tag in ("serial", "console", "parallel", "channel"):
            for node in devices.findall(tag):
                source = node.find("source")
                if node.get("type") == "file" and source is not None and source.get("path"):
                    if scratch_dir is None:
                        devices.remove(node)
                    else:
                        source.set("path", posixpath.join(scratch_dir, f"{tag}-{posixpath.basename(source.get('path'))}"))
    if name is not None:
        for graphics in devices.findall("graphics"):  # a fixed port would clash with the original's
            if graphics.get("port") not in (None, "-1") and graphics.get("autoport") != "yes":
                graphics.set("autoport", "yes")
                graphics.attrib.pop("port", None)
    return ET.tostring(root, encoding="unicode")


def declared_nvram(domain_xml: str) -> bool:
    """Given a domain XML, return whether it declares a per-VM NVRAM (`<os><nvram>` or UEFI firmware)."""
    root = ET.fromstring(domain_xml)
    os_node = root.find("os")
    if os_node is None:
        return False
    loader = os_node.find("loader")
    return (os_node.find("nvram") is not None or os_node.get("firmware") == "efi"
            or (loader is not None and loader.get("type") == "pflash"))


def removable_skipped_disks(meta: dict) -> list[str]:
    """Given meta.json, return targets of writable disks left out of the backup (they would be shared with the original)."""
    result = []
    for skipped in meta.get("skipped_disks") or []:
        reason = str(skipped.get("reason", ""))
        if reason.startswith(("device is a", "read-only", "shareable", "network", "volume")):
            continue
        result.append(check_target(skipped.get("target")))
    return result
