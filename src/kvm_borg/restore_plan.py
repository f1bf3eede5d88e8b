"""What a restore will write and define: pure functions, no I/O.

Given an archive's `meta.json`, the paths the archive holds and the user's options, decide
where every file goes (`plan_restore`) and how the domain XML changes (`rewrite_domain_xml`).
Everything that comes from an archive is untrusted: archive paths must be relative and stay
inside the archive, host paths must be absolute and normalized, disk targets must be plain
device names. A violation is a UsageError naming the offending value.
"""

from __future__ import annotations

import json
import posixpath
import random
import re
import uuid as uuid_module
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from kvm_borg.errors import UsageError

META_SUFFIX = "/meta.json"
TPM_STATE_ROOT = "/var/lib/libvirt/swtpm"
_TARGET_RE = re.compile(r"^[a-z][a-z0-9]{0,31}$")
_FORMAT_RE = re.compile(r"^[a-z0-9]{1,16}$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


# --- validation of what an archive says --------------------------------------------------------


def check_archive_path(path: object, what: str = "archive path") -> str:
    """Given a path an archive names, return it normalized; absolute or escaping ("..") ones are a UsageError."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UsageError(f"archive names an invalid {what}: {path!r}")
    if path.startswith("/"):
        raise UsageError(f"archive names an absolute {what}, refused: {path!r}")
    normalized = posixpath.normpath(path)
    if normalized == ".." or normalized.startswith("../") or ".." in path.split("/"):
        raise UsageError(f"archive names a {what} outside the archive, refused: {path!r}")
    return normalized


def check_host_path(path: object, what: str = "host path") -> str:
    """Given a host path an archive names (an image's original place), return it; relative or ".." ones are a UsageError."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise UsageError(f"archive names an invalid {what}: {path!r}")
    if not path.startswith("/"):
        raise UsageError(f"archive names a relative {what}, refused: {path!r}")
    if ".." in path.split("/") or posixpath.normpath(path) != path:
        raise UsageError(f"archive names a {what} with '..' or redundant parts, refused: {path!r}")
    if path == "/" or path.endswith("/"):
        raise UsageError(f"archive names a directory as {what}, refused: {path!r}")
    return path


def check_target(target: object) -> str:
    """Given a disk target from an archive (e.g. "vda"), return it; anything but a plain device name is a UsageError."""
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise UsageError(f"archive names an invalid disk target: {target!r}")
    return target


def check_format(fmt: object) -> str:
    """Given an image format from an archive, return it ("raw", "qcow2"...); anything else is a UsageError."""
    if not isinstance(fmt, str) or not _FORMAT_RE.match(fmt):
        raise UsageError(f"archive names an invalid image format: {fmt!r}")
    return fmt


def safe_file_name(name: str) -> str:
    """Given a domain name, return a string safe as part of a file name (no "/", no leading dot)."""
    safe = _NAME_UNSAFE.sub("_", name).lstrip(".")
    return safe or "domain"


# --- finding and reading meta.json -------------------------------------------------------------


def meta_candidates(paths: list[str]) -> list[str]:
    """Given an archive's paths, return those that may be kvm-borg's meta.json (ending in /meta.json)."""
    return [p for p in paths if ("/" + p.lstrip("/")).endswith(META_SUFFIX)]


def parse_meta(text: str) -> dict | None:
    """Given a file's text, return it as kvm-borg meta.json, or None if it is not one."""
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
    """One stored file and where it goes."""

    archive_path: str
    destination: str
    mode: int = 0o600
    owner: str | None = None  # user name recorded at backup time
    group: str | None = None


@dataclass(frozen=True)
class RestoreDisk:
    """One disk: its image (and backing files, top first below it) and its format."""

    target: str
    format: str
    image: RestoreFile
    virtual_size: int
    backing: tuple[tuple[RestoreFile, str], ...] = ()  # (file, format) of each backing layer, top first


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


def _stat_fields(entry: dict) -> dict:
    owner = entry.get("owner") if isinstance(entry.get("owner"), dict) else {}
    mode = owner.get("mode")
    return {
        "mode": (mode & 0o666) if isinstance(mode, int) and mode & 0o600 else 0o600,
        "owner": owner.get("user") if isinstance(owner.get("user"), str) else None,
        "group": owner.get("group") if isinstance(owner.get("group"), str) else None,
    }


def _image_name(original: str, target: str, fmt: str, new_name: str | None) -> str:
    if new_name is None:
        return posixpath.basename(original)
    return f"{safe_file_name(new_name)}-{target}.{fmt}"


def plan_restore(
    meta: dict,
    archive_paths: set[str] | frozenset[str],
    *,
    target_dir: str | None = None,
    new_name: str | None = None,
    new_uuid: str | None = None,
    disks: list[str] | tuple[str, ...] = (),
    with_xml: bool = True,
) -> RestorePlan:
    """Given meta.json, the archive's paths and the options, return the RestorePlan.

    Default destinations are the original paths from meta.json (cross-node restores take them
    from the archive, never from this host). With `target_dir`, every file goes into it. With
    `new_name`, the domain gets that name and `new_uuid`, and images are named
    `NEW-TARGET.FORMAT` so the copy never shares a file with the original."""
    if target_dir is not None:
        target_dir = check_host_path(posixpath.normpath(target_dir), "target directory") if target_dir != "/" else "/"
    original_name = meta["domain"].get("name")
    original_uuid = meta["domain"].get("uuid")
    if not isinstance(original_name, str) or not isinstance(original_uuid, str):
        raise UsageError("archive meta.json names no domain name or UUID")
    name = new_name if new_name is not None else original_name
    domain_uuid = (new_uuid or str(uuid_module.uuid4())) if new_name is not None else original_uuid
    warnings: list[str] = []

    def present(path: str, what: str) -> str:
        checked = check_archive_path(path, what)
        if checked not in archive_paths:
            raise UsageError(f"archive lacks {what} {checked} that its meta.json names")
        return checked

    def destination(original: str, file_name: str) -> str:
        directory = target_dir if target_dir is not None else posixpath.dirname(original)
        return posixpath.join(directory, file_name)

    archived = {}
    for entry in meta["disks"]:
        if not isinstance(entry, dict):
            raise UsageError("archive meta.json has a malformed disk entry")
        archived[check_target(entry.get("target"))] = entry
    unknown = [t for t in disks if t not in archived]
    if unknown:
        raise UsageError(f"archive has no disk {', '.join(unknown)} (it has {', '.join(archived) or 'none'})")
    chosen = [t for t in archived if not disks or t in disks]

    restore_disks = []
    for target in chosen:
        entry = archived[target]
        fmt = check_format(entry.get("format", "raw"))
        original = check_host_path(entry.get("original_source"), f"original source of disk {target}")
        if entry.get("block_device") and target_dir is None:
            raise UsageError(
                f"disk {target} was the block device {original}: give --target-dir to restore it as a file"
            )
        file_name = _image_name(original, target, fmt, new_name)
        if entry.get("block_device"):
            file_name = f"{safe_file_name(name)}-{target}.{fmt}"
        image = RestoreFile(present(entry.get("archive_path"), f"image of disk {target}"),
                            destination(original, file_name), **_stat_fields(entry))
        backing = []
        for layer in entry.get("backing_chain") or []:
            layer_original = check_host_path(layer.get("path"), f"backing file of disk {target}")
            layer_name = posixpath.basename(layer_original)
            if new_name is not None:
                layer_name = f"{safe_file_name(new_name)}-{target}-{layer_name}"
            backing.append((
                RestoreFile(present(layer.get("archive_path"), f"backing file of disk {target}"),
                            destination(layer_original, layer_name), **_stat_fields(entry)),
                check_format(layer.get("format", "qcow2")),
            ))
        restore_disks.append(RestoreDisk(target, fmt, image, int(entry.get("virtual_size") or 0), tuple(backing)))

    nvram = None
    firmware = meta.get("firmware") or {}
    files = meta.get("files") or {}
    if firmware.get("nvram") and not disks:
        original = check_host_path(firmware["nvram"], "NVRAM path")
        if files.get("nvram"):
            nvram_name = posixpath.basename(original) if new_name is None else f"{safe_file_name(name)}_VARS.fd"
            nvram = RestoreFile(present(files["nvram"], "NVRAM file"), destination(original, nvram_name),
                                **_stat_fields(firmware))
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
            relative = check_archive_path(item.get("relative"), "TPM state file")
            tpm_files.append(RestoreFile(present(item.get("archive_path"), "TPM state file"),
                                         posixpath.join(tpm_dir, relative), **_stat_fields(item)))

    xml_path = None
    if with_xml and not disks:
        first = restore_disks[0].image.destination if restore_disks else None
        directory = target_dir or (posixpath.dirname(first) if first else None)
        if directory is None:
            raise UsageError("the archive has no disk: give --target-dir for the domain XML")
        xml_path = posixpath.join(directory, f"{safe_file_name(name)}.xml")

    seen: dict[str, str] = {}
    plan = RestorePlan(name, domain_uuid, original_name, original_uuid, restore_disks, nvram, tpm_files,
                       tpm_dir, xml_path, warnings)
    for path in plan.destinations():
        if path in seen:
            raise UsageError(f"two restored files would both be written to {path}")
        seen[path] = path
    return plan


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
