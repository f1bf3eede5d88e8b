"""Sanitizing a restored domain XML: pure functions, no I/O, no libvirt.

The domain XML inside an archive is untrusted: whoever wrote the repository chose it. Before a
restored domain is defined or booted, `sanitize_domain_xml` keeps only what cannot make this
host run a program, open a host file or device, or bypass its security labelling:

- every element of the QEMU namespace (`qemu:commandline`, `qemu:capabilities`,
  `qemu:override`...) is removed;
- every `<seclabel>` (domain or device level) is removed: the host's default labelling applies
  (a warning when one of them was `type='none'`, `relabel='no'` or a fixed label);
- top-level elements outside a known list are removed (e.g. `<resource>`, `<idmap>`,
  `<bootloader>`); `<memoryBacking><source>` and `<blkiotune><device>` (host paths) too;
- `<devices>` keeps only known kinds (disk, controller, interface, input, graphics, video, sound,
  audio, serial, parallel, console, channel, watchdog, memballoon, rng, panic, vsock, iommu,
  tpm, hub); hostdev, redirdev, smartcard, shmem, filesystem (host shares), lease, memory
  (nvdimm/virtio-pmem backed by host files) and anything unknown are dropped with a warning;
- disks: only the restored targets stay (as restore_plan.rewrite_domain_xml rewrote them:
  file disks on the restored images); every other disk or lun or floppy, whatever its type
  (network, volume, block, file, dir, nvme, vhostuser) is dropped with a warning naming it;
  a cdrom keeps its drive and loses its source (an empty tray);
- interfaces of type direct, hostdev, vhostuser, vdpa and ethernet (host taps, scripts) are
  dropped; any `<script>`/`<downscript>` and a `<backend tap=... vhost=...>` are removed;
  with `isolate` (verify --boot) every interface is dropped;
- input: only mouse/tablet/keyboard without a host source (no passthrough, no evdev);
- tpm: only the `emulator` backend (a passthrough TPM opens the host's /dev/tpm*);
- graphics listening on a unix socket path, audio writing to a file, rng reading anything but
  /dev/random, /dev/urandom or /dev/hwrng (or an egd chardev with a host path) are dropped;
- character devices (serial, parallel, console, channel) of type file, unix, dev or pipe keep
  their host path only when it is allowed (see below); otherwise the device becomes a `pty`
  (a unix channel without a path is libvirt-managed and kept); a chardev `<log file=...>`
  outside the allowed places is removed;
- `<emulator>` becomes this host's emulator (from libvirt's domain capabilities), or is
  removed so libvirt picks its default;
- `<os>`: `<kernel>`, `<initrd>`, `<dtb>` (and `<cmdline>` with a dropped kernel) and
  `<acpi><table>` stay only under libvirt's boot directory or when the local definition of the
  same domain uses that exact path; `<loader>` must be one of this host's firmware files (or
  in the same directory as one): an archived loader whose file name matches one of them is
  replaced by it, with `<os firmware=...>` autoselection its path is dropped (libvirt selects),
  any other is refused (UsageError); `<nvram template=...>` stays only next to a host firmware file; the `<nvram>`
  path must be the restored one (or under libvirt's NVRAM directory).

Allowed host paths (`HostFacts`): paths the local definition of the same domain (matched by
UUID) uses, libvirt's own directories, and the scratch directory of a verify drill.
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from kvm_borg.errors import UsageError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
LIBVIRT_BOOT_DIRS = ("/var/lib/libvirt/boot",)
LIBVIRT_NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
# libvirt's own places for character device logs and channel sockets
CHARDEV_DIRS = ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu/channel", "/run/libvirt/qemu/channel")
RNG_DEVICES = ("/dev/random", "/dev/urandom", "/dev/hwrng")

DOMAIN_CHILDREN = frozenset({
    "name", "uuid", "genid", "title", "description", "metadata", "maxMemory", "memory", "currentMemory",
    "blkiotune", "memtune", "memoryBacking", "vcpu", "vcpus", "iothreads", "iothreadids", "cputune",
    "numatune", "os", "features", "cpu", "clock", "on_poweroff", "on_reboot", "on_crash", "on_lockfailure",
    "pm", "perf", "devices", "sysinfo", "keywrap", "launchSecurity", "throttlegroups", "defaultiothread",
})
DEVICE_KINDS = frozenset({
    "emulator", "disk", "controller", "interface", "input", "graphics", "video", "sound", "audio",
    "serial", "parallel", "console", "channel", "watchdog", "memballoon", "rng", "panic", "vsock",
    "iommu", "tpm", "hub", "crypto", "pstore",
})
CHARDEV_KINDS = ("serial", "parallel", "console", "channel")
DROPPED_INTERFACE_TYPES = frozenset({"direct", "hostdev", "vhostuser", "vdpa", "ethernet"})
SAFE_INPUT_TYPES = frozenset({"mouse", "tablet", "keyboard"})


@dataclass(frozen=True)
class HostFacts:
    """What this host (not the archive) says: its emulator, its firmware files, trusted paths.

    `emulator`: the emulator binary from libvirt's domain capabilities (None: unknown, the
    `<emulator>` element is removed). `loaders`: firmware files the host offers. `trusted_paths`:
    host paths the local definition of the same domain uses (it was written on this host)."""

    emulator: str | None = None
    loaders: frozenset[str] = frozenset()
    trusted_paths: frozenset[str] = frozenset()


@dataclass
class _Sanitizer:
    host: HostFacts
    restored_targets: frozenset[str]
    nvram: str | None
    isolate: bool
    scratch_dir: str | None
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def path_allowed(self, path: str | None, roots: tuple[str, ...] = ()) -> bool:
        """Whether a host path named by the archive may stay: trusted, or inside `roots` (or scratch)."""
        if not path or "\0" in path or not path.startswith("/"):
            return False
        normalized = posixpath.normpath(path)
        if normalized != path or ".." in path.split("/"):
            return False
        if path in self.host.trusted_paths:
            return True
        if self.scratch_dir:
            roots = roots + (self.scratch_dir,)
        return any(path.startswith(root.rstrip("/") + "/") for root in roots)


def _qname(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return namespace, local
    return None, tag


def _remove_qemu_namespace(parent: ET.Element, s: _Sanitizer) -> None:
    for child in list(parent):
        namespace, local = _qname(child.tag) if isinstance(child.tag, str) else (None, "")
        if namespace == QEMU_NS:
            parent.remove(child)
            s.warn(f"removed <qemu:{local}> from the archived XML (it passes arguments to QEMU directly)")
        else:
            _remove_qemu_namespace(child, s)


def _remove_seclabels(parent: ET.Element, s: _Sanitizer) -> None:
    for child in list(parent):
        if child.tag == "seclabel":
            parent.remove(child)
            label = child.find("label")
            if child.get("type") in ("none", "static") or child.get("relabel") == "no" or label is not None:
                what = " ".join(f"{k}='{v}'" for k, v in sorted(child.attrib.items()))
                s.warn(f"removed <seclabel {what}>: this host's default security labelling applies")
        else:
            _remove_seclabels(child, s)


def _describe_disk(disk: ET.Element) -> str:
    target = disk.find("target")
    dev = target.get("dev") if target is not None else "?"
    source = disk.find("source")
    where = ""
    if source is not None:
        attrs = source.attrib
        where = (attrs.get("file") or attrs.get("dev") or attrs.get("dir")
                 or "/".join(filter(None, (attrs.get("protocol"), attrs.get("name"))))
                 or "/".join(filter(None, (attrs.get("pool"), attrs.get("volume")))) or "")
    return f"{disk.get('type', 'file')} {disk.get('device', 'disk')} {dev}" + (f" ({where})" if where else "")


def _sanitize_disk(devices: ET.Element, disk: ET.Element, s: _Sanitizer) -> None:
    target = disk.find("target")
    dev = target.get("dev") if target is not None else None
    if disk.get("device") == "cdrom":
        for child in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(child)
            medium = child.get("file") or child.get("dev") or child.get("name") or disk.get("type")
            s.warn(f"cdrom {dev}: its medium ({medium}) was removed: the drive stays empty")
        disk.set("type", "file")
        for child in disk.findall("auth") + disk.findall("mirror"):
            disk.remove(child)
        return
    if dev not in s.restored_targets:
        devices.remove(disk)
        s.warn(f"disk {_describe_disk(disk)} was not restored: it is not attached to the restored domain")
        return
    source = disk.find("source")
    if disk.get("type") != "file" or source is None or set(source.attrib) != {"file"} or len(source):
        raise UsageError(f"restored disk {dev} is not a plain file disk after rewriting; refusing to define it")
    for tag in ("mirror", "backingStore", "auth", "reservations"):
        for child in disk.findall(tag):
            disk.remove(child)


def _sanitize_interface(devices: ET.Element, interface: ET.Element, s: _Sanitizer) -> None:
    kind = interface.get("type", "?")
    mac = interface.find("mac")
    name = f"interface type='{kind}'" + (f" ({mac.get('address')})" if mac is not None and mac.get("address") else "")
    if s.isolate:
        devices.remove(interface)
        return
    if kind in DROPPED_INTERFACE_TYPES:
        devices.remove(interface)
        s.warn(f"{name} was removed: it would attach the restored domain to a host device, tap or script")
        return
    for tag in ("script", "downscript"):
        for child in interface.findall(tag):
            interface.remove(child)
            s.warn(f"{name}: <{tag} path='{child.get('path')}'> was removed")
    for backend in interface.findall("backend"):
        if backend.get("tap") or backend.get("vhost"):
            interface.remove(backend)
            s.warn(f"{name}: <backend> with host device paths was removed")


def _chardev_path(node: ET.Element) -> str | None:
    source = node.find("source")
    return source.get("path") if source is not None else None


def _sanitize_chardev(devices: ET.Element, node: ET.Element, s: _Sanitizer) -> None:
    kind = node.get("type", "pty")
    tag = node.tag
    for log in node.findall("log"):
        if not s.path_allowed(log.get("file"), CHARDEV_DIRS):
            node.remove(log)
            s.warn(f"{tag}: its log file {log.get('file')!r} was removed")
    if kind not in ("file", "unix", "dev", "pipe"):
        for source in node.findall("source"):
            if source.get("path"):
                del source.attrib["path"]
        return
    path = _chardev_path(node)
    if kind == "unix" and path is None:
        return  # libvirt chooses the socket path itself (e.g. the guest agent channel)
    if kind in ("file", "unix") and s.path_allowed(path, CHARDEV_DIRS):
        return
    if tag == "channel" and kind == "unix":
        for source in node.findall("source"):
            node.remove(source)  # libvirt generates a path in its own channel directory
        s.warn(f"channel {kind} at {path!r}: the socket path was removed (libvirt chooses one)")
        return
    for source in node.findall("source"):
        node.remove(source)
    node.set("type", "pty")
    s.warn(f"{tag} {kind} at {path!r} became a pty: the archive may not name host paths")


def _sanitize_devices(devices: ET.Element, s: _Sanitizer) -> None:
    for node in list(devices):
        tag = node.tag if isinstance(node.tag, str) else ""
        if tag not in DEVICE_KINDS:
            devices.remove(node)
            s.warn(f"<{tag}> device (type {node.get('type') or node.get('model') or '-'}) was removed: "
                   "it would give the restored domain host devices or host files")
        elif tag == "emulator":
            continue
        elif tag == "disk":
            _sanitize_disk(devices, node, s)
        elif tag == "interface":
            _sanitize_interface(devices, node, s)
        elif tag in CHARDEV_KINDS:
            _sanitize_chardev(devices, node, s)
        elif tag == "input":
            if node.get("type") not in SAFE_INPUT_TYPES or node.find("source") is not None:
                devices.remove(node)
                s.warn(f"<input type='{node.get('type')}'> was removed: it passes a host input device through")
        elif tag == "tpm":
            backend = node.find("backend")
            if backend is None or backend.get("type") != "emulator":
                devices.remove(node)
                s.warn(f"<tpm> with backend {backend.get('type') if backend is not None else 'none'!r} was "
                       "removed: only an emulated TPM is restored")
        elif tag == "graphics":
            listens = [listen for listen in node.findall("listen") if listen.get("type") == "socket"]
            if node.get("socket") or listens or node.get("type") not in ("vnc", "spice"):
                devices.remove(node)
                s.warn(f"<graphics type='{node.get('type')}'> was removed: it names a host socket or program")
        elif tag == "audio":
            if node.get("type") not in (None, "none", "spice") or node.get("path"):
                devices.remove(node)
                s.warn(f"<audio type='{node.get('type')}'> was removed: it reaches host audio or files")
        elif tag == "rng":
            backend = node.find("backend")
            ok = backend is not None and (
                (backend.get("model") == "random" and (backend.text or "/dev/urandom").strip() in RNG_DEVICES)
                or backend.get("model") == "builtin")
            if not ok:
                devices.remove(node)
                s.warn("<rng> with a host path or egd source was removed")
        elif tag == "crypto":
            backend = node.find("backend")
            if backend is None or backend.get("model") != "builtin":
                devices.remove(node)
                s.warn("<crypto> with a non-builtin backend was removed")
        elif tag == "pstore":
            devices.remove(node)  # backed by a host file the archive names
            s.warn("<pstore> was removed: it is backed by a host file")
    if s.host.emulator:
        emulator = devices.find("emulator")
        if emulator is None:
            emulator = ET.Element("emulator")
            devices.insert(0, emulator)
        emulator.text = s.host.emulator
    else:
        for emulator in devices.findall("emulator"):
            devices.remove(emulator)


def _host_loader(loader_path: str, host: HostFacts) -> str | None:
    """Given an archived loader path, return this host's firmware file to use instead, or None.

    A host firmware file, or a file in the same directory as one (the firmware package's own
    directory, e.g. /usr/share/OVMF/), stays; else one of the host's with the same file name."""
    normalized = posixpath.normpath(loader_path)
    if loader_path in host.loaders or (
            normalized == loader_path and any(posixpath.dirname(p) == posixpath.dirname(loader_path)
                                              for p in host.loaders)):
        return loader_path
    same_name = [p for p in sorted(host.loaders) if posixpath.basename(p) == posixpath.basename(loader_path)]
    return same_name[0] if same_name else None


def _sanitize_os(root: ET.Element, s: _Sanitizer) -> None:
    os_node = root.find("os")
    if os_node is None:
        return
    kernel = os_node.find("kernel")
    if kernel is not None and not s.path_allowed((kernel.text or "").strip(), LIBVIRT_BOOT_DIRS):
        s.warn(f"direct kernel boot from {(kernel.text or '').strip()!r} was removed (not in {LIBVIRT_BOOT_DIRS[0]}/ "
               "nor in this host's definition of the domain): the domain boots from its disks")
        for tag in ("kernel", "initrd", "cmdline", "dtb"):
            for node in os_node.findall(tag):
                os_node.remove(node)
    for tag in ("initrd", "dtb"):
        for node in os_node.findall(tag):
            if not s.path_allowed((node.text or "").strip(), LIBVIRT_BOOT_DIRS):
                os_node.remove(node)
                s.warn(f"<{tag}> {(node.text or '').strip()!r} was removed (not in {LIBVIRT_BOOT_DIRS[0]}/)")
    for acpi in os_node.findall("acpi"):
        for table in acpi.findall("table"):
            if not s.path_allowed((table.text or "").strip(), LIBVIRT_BOOT_DIRS):
                acpi.remove(table)
                s.warn(f"ACPI table {(table.text or '').strip()!r} was removed")
    loader = os_node.find("loader")
    if loader is not None and (loader.text or "").strip():
        archived = (loader.text or "").strip()
        if archived not in s.host.trusted_paths:
            local = _host_loader(archived, s.host)
            if local is None and os_node.get("firmware"):
                loader.text = None  # firmware autoselection: libvirt picks this host's file
                s.warn(f"firmware {archived!r} is not this host's: libvirt selects this host's "
                       f"{os_node.get('firmware')} firmware")
                local = ""
            if local is None:
                offered = ", ".join(sorted(s.host.loaders)) or "none"
                raise UsageError(f"the archived domain's firmware {archived!r} is not one of this host's "
                                 f"firmware files ({offered}); refusing to define it")
            if local and local != archived:
                s.warn(f"firmware {archived!r} replaced by this host's {local!r}")
                loader.text = local
    nvram = os_node.find("nvram")
    if nvram is not None:
        template = nvram.get("template")
        if template and template not in s.host.trusted_paths and not any(
                posixpath.dirname(template) == posixpath.dirname(p) for p in s.host.loaders):
            del nvram.attrib["template"]
            s.warn(f"NVRAM template {template!r} was removed (not beside this host's firmware)")
        path = (nvram.text or "").strip()
        if path and path != s.nvram and not s.path_allowed(path, (LIBVIRT_NVRAM_DIR,)):
            nvram.text = None
            s.warn(f"NVRAM path {path!r} was removed: libvirt chooses one in {LIBVIRT_NVRAM_DIR}/")


def _sanitize_top_level(root: ET.Element, s: _Sanitizer) -> None:
    for child in list(root):
        tag = child.tag if isinstance(child.tag, str) else ""
        if tag not in DOMAIN_CHILDREN:
            root.remove(child)
            s.warn(f"<{tag}> was removed from the archived XML")
    for backing in root.findall("memoryBacking"):
        for source in backing.findall("source"):
            if source.get("type") not in (None, "anonymous", "memfd"):
                backing.remove(source)
                s.warn(f"<memoryBacking><source type='{source.get('type')}'> was removed (host files)")
    for tune in root.findall("blkiotune"):
        for device in tune.findall("device"):
            tune.remove(device)
            s.warn("<blkiotune><device> naming a host device was removed")


def sanitize_domain_xml(
    domain_xml: str,
    *,
    restored_targets: set[str] | frozenset[str] | list[str],
    host: HostFacts,
    nvram: str | None = None,
    isolate: bool = False,
    scratch_dir: str | None = None,
) -> tuple[str, list[str]]:
    """Given a restored domain XML (already rewritten by restore_plan), the targets of the disks that
    were restored, this host's facts, the restored NVRAM path and whether it is an isolated verify
    copy (with its scratch directory), return (the sanitized XML, warnings naming what was removed
    or changed). A firmware that is not this host's, or a restored disk that is not a plain file
    disk, is a UsageError. Rules: the module docstring."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise UsageError(f"the archived domain XML is not well-formed: {exc}") from None
    if root.tag != "domain":
        raise UsageError(f"the archived domain XML has <{root.tag}> at its root, not <domain>")
    s = _Sanitizer(host, frozenset(restored_targets), nvram, isolate, scratch_dir)
    _remove_qemu_namespace(root, s)
    _remove_seclabels(root, s)
    _sanitize_top_level(root, s)
    _sanitize_os(root, s)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    _sanitize_devices(devices, s)
    ET.register_namespace("qemu", QEMU_NS)
    return ET.tostring(root, encoding="unicode"), s.warnings


# --- facts from this host, as pure parsers of libvirt's XML ----------------------------------


def capabilities_query(domain_xml: str) -> tuple[str | None, str | None]:
    """Given a domain XML, return (arch, virt type) to ask libvirt's domain capabilities about."""
    root = ET.fromstring(domain_xml)
    os_type = root.find("os/type")
    arch = os_type.get("arch") if os_type is not None else None
    return arch, root.get("type")


def parse_domain_capabilities(caps_xml: str) -> tuple[str | None, frozenset[str]]:
    """Given `getDomainCapabilities` XML, return (the emulator path, the firmware files it offers)."""
    root = ET.fromstring(caps_xml)
    path = root.findtext("path")
    loaders = frozenset((v.text or "").strip() for v in root.findall("os/loader/value") if (v.text or "").strip())
    return (path.strip() if path else None), loaders


def trusted_paths_of(local_xml: str | None) -> frozenset[str]:
    """Given the local definition of the same domain (or None), return the host paths it uses for
    boot files, firmware, NVRAM template and character devices: the archive may name those."""
    if not local_xml:
        return frozenset()
    root = ET.fromstring(local_xml)
    paths = set()
    for tag in ("os/kernel", "os/initrd", "os/dtb", "os/loader", "os/acpi/table"):
        for node in root.findall(tag):
            if (node.text or "").strip():
                paths.add((node.text or "").strip())
    for node in root.findall("os/nvram"):
        if node.get("template"):
            paths.add(node.get("template"))
    for kind in CHARDEV_KINDS:
        for node in root.findall(f"devices/{kind}"):
            source = node.find("source")
            if node.get("type") in ("file", "unix") and source is not None and source.get("path"):
                paths.add(source.get("path"))
    return frozenset(p for p in paths if p.startswith("/"))


def isolation_violations(domain_xml: str, *, images: set[str] | frozenset[str], scratch_dir: str) -> list[str]:
    """Given the XML libvirt holds for a verify copy, the restored image paths and the scratch directory,
    return what breaks its isolation (empty: none): any interface, host device, QEMU namespace element,
    `seclabel type='none'`, a disk source other than a restored image, a chardev file outside scratch."""
    root = ET.fromstring(domain_xml)
    problems = []
    for node in root.iter():
        namespace, local = _qname(node.tag) if isinstance(node.tag, str) else (None, "")
        if namespace == QEMU_NS:
            problems.append(f"<qemu:{local}>")
        elif local == "seclabel" and (node.get("type") == "none" or node.get("relabel") == "no"):
            problems.append("a seclabel without confinement")
    devices = root.find("devices")
    for node in list(devices) if devices is not None else []:
        if node.tag in ("interface", "hostdev", "redirdev", "smartcard", "shmem", "filesystem"):
            problems.append(f"<{node.tag} type='{node.get('type')}'>")
        elif node.tag == "disk":
            source = node.find("source")
            attrs = dict(source.attrib) if source is not None else {}
            path = attrs.get("file")
            if source is not None and (node.get("type") != "file" or path not in images):
                problems.append(f"disk source {attrs}")
        elif node.tag in CHARDEV_KINDS and node.get("type") in ("file", "dev", "pipe"):
            path = _chardev_path(node) or ""
            if not path.startswith(scratch_dir.rstrip("/") + "/"):
                problems.append(f"{node.tag} {node.get('type')} at {path!r}")
    return problems
