"""Throwaway libvirt domains for tests.

A test domain has no OS: SeaBIOS (or OVMF with ``firmware="efi"``) finds no
bootable disk and just keeps the VM running, which is all a backup of a *live*
domain needs.  Disks are virtio, filled with known content (see
:mod:`tests.harness.images` for the fill modes); there is no network interface.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import shutil
import stat
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import libvirt

from . import images
from .runs import DOMAIN_PREFIX, make_dir

QEMU_USER = "libvirt-qemu"


# ------------------------------------------------------------------ virt type

def _kvm_usable_by_qemu_user() -> bool:
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return False
    if not stat.S_ISCHR(st.st_mode):
        return False
    mode = st.st_mode
    if mode & 0o006 == 0o006:
        return True
    try:
        pw = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return os.access("/dev/kvm", os.R_OK | os.W_OK)  # unknown setup: trust root's view
    if st.st_uid == pw.pw_uid and mode & 0o600 == 0o600:
        return True
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if QEMU_USER in g.gr_mem}
    return st.st_gid in gids and mode & 0o060 == 0o060


@functools.lru_cache(maxsize=None)
def virt_type(conn: libvirt.virConnect | None = None) -> str:
    """``"kvm"`` when /dev/kvm exists and the QEMU user can use it, else ``"qemu"`` (TCG).

    ``KVM_BORG_TEST_VIRT_TYPE=qemu|kvm`` forces a choice.  With ``conn`` the choice
    is confirmed with the domain capabilities of libvirt.
    """
    forced = os.environ.get("KVM_BORG_TEST_VIRT_TYPE")
    if forced:
        return forced
    if not _kvm_usable_by_qemu_user():
        return "qemu"
    if conn is not None:
        try:
            conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        except libvirt.libvirtError:
            return "qemu"
    return "kvm"


# ------------------------------------------------------------------ XML helpers

def _disk_elements(xml: str):
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        if target is None:
            continue
        yield target.get("dev"), disk


def _source_of(disk: ET.Element) -> str | None:
    src = disk.find("source")
    if src is None:
        return None
    for attr in ("file", "dev", "name", "dir"):
        if src.get(attr):
            return src.get(attr)
    return None


def live_sources(dom: libvirt.virDomain) -> dict[str, str]:
    """``{target: source path}`` of the disks in the live XML (the active layer)."""
    return {t: _source_of(d) for t, d in _disk_elements(dom.XMLDesc(0)) if _source_of(d)}


def inactive_sources(dom: libvirt.virDomain) -> dict[str, str]:
    """``{target: source path}`` of the disks in the inactive (persistent) XML."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    return {t: _source_of(d) for t, d in _disk_elements(xml) if _source_of(d)}


def disk_aliases(dom: libvirt.virDomain) -> dict[str, str]:
    """``{target: alias}`` from the live XML (e.g. ``{"vda": "virtio-disk0"}``)."""
    out = {}
    for t, d in _disk_elements(dom.XMLDesc(0)):
        alias = d.find("alias")
        if alias is not None and alias.get("name"):
            out[t] = alias.get("name")
    return out


def disk_formats(dom: libvirt.virDomain, inactive: bool = False) -> dict[str, str]:
    """``{target: driver type}`` (qcow2/raw) from the live or inactive XML."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    out = {}
    for t, d in _disk_elements(xml):
        drv = d.find("driver")
        if drv is not None and drv.get("type"):
            out[t] = drv.get("type")
    return out


# ------------------------------------------------------------------ specs

@dataclass
class DiskSpec:
    """One disk of a test domain.

    target:   guest device name (vda, vdb, ...); bus is virtio
    fmt:      "qcow2" or "raw"
    size_mib: virtual size in MiB
    fill:     see tests/harness/images.py ("pattern", "zero"/None, int byte,
              "random", "sparse", or a list of (pattern, offset, length))
    seed:     seed for "pattern"/"sparse"/"random" (default: derived from target,
              so disks of one domain differ)
    filename: image file name inside the domain's directory (default
              "<target>.<fmt>"; may contain spaces / non-ASCII)
    """

    target: str = "vda"
    fmt: str = "qcow2"
    size_mib: int = 64
    fill: images.Fill = "pattern"
    seed: int | None = None
    filename: str | None = None

    def effective_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return sum(self.target.encode()) % 251

    def effective_filename(self) -> str:
        return self.filename or f"{self.target}.{self.fmt}"


def domain_xml(name: str, disks: dict[str, tuple[str, str]], *, vtype: str, memory_mib: int = 64,
               firmware: str = "bios") -> str:
    """Minimal domain XML. ``disks``: ``{target: (path, fmt)}``."""
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type={quoteattr(fmt)}/>
      <source file={quoteattr(str(path))}/>
      <target dev={quoteattr(target)} bus='virtio'/>
    </disk>"""
        for target, (path, fmt) in disks.items()
    )
    if firmware == "efi":
        os_xml = """
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <firmware><feature enabled='no' name='secure-boot'/></firmware>
    <boot dev='hd'/>
  </os>"""
    elif firmware == "bios":
        os_xml = """
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
    <bios rebootTimeout='-1'/>
  </os>"""
    else:
        raise ValueError(f"firmware must be 'bios' or 'efi', not {firmware!r}")
    return f"""<domain type={quoteattr(vtype)}>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>{os_xml}
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{disk_xml}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# ------------------------------------------------------------------ removal

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
)


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    """Destroy and undefine ``name`` (snapshot/checkpoint metadata, NVRAM, managed save).

    Never raises for "domain already gone".
    """
    for _attempt in range(3):
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        try:
            if dom.isActive():
                # Block jobs (e.g. a backup job) die with the QEMU process.
                dom.destroyFlags(0)
        except libvirt.libvirtError:
            pass
        try:
            if dom.isPersistent():
                try:
                    dom.undefineFlags(_UNDEFINE_FLAGS)
                except libvirt.libvirtError:
                    # Remove metadata one by one, then try a plain undefine.
                    for snap in _safe(dom.listAllSnapshots, 0) or []:
                        _safe(snap.delete, libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                    for cp in _safe(getattr(dom, "listAllCheckpoints", lambda f: []), 0) or []:
                        _safe(cp.delete, getattr(libvirt, "VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY", 0))
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError:
            pass
        try:
            conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        time.sleep(0.5)
    raise RuntimeError(f"could not remove test domain {name!r}")


def _safe(fn, *args):
    try:
        return fn(*args)
    except libvirt.libvirtError:
        return None


# ------------------------------------------------------------------ domains

@dataclass
class TestDomain:
    """A throwaway domain.  ``disks``/``formats`` describe the disks *as created*;
    use :meth:`live_sources` for what the running VM uses now (e.g. an overlay)."""

    __test__ = False  # not a pytest test class

    conn: libvirt.virConnect
    name: str
    dir: Path
    disks: dict[str, Path]
    formats: dict[str, str]
    specs: dict[str, DiskSpec]
    persistent: bool
    firmware: str = "bios"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dom(self) -> libvirt.virDomain:
        """A fresh virDomain handle (lookup by name, so it survives undefine/define)."""
        return self.conn.lookupByName(self.name)

    # state
    def is_active(self) -> bool:
        return bool(self.dom.isActive())

    def start(self) -> None:
        self.dom.create()
        wait_state(self.dom, libvirt.VIR_DOMAIN_RUNNING)

    def destroy(self) -> None:
        """Hard power-off (the disks are then consistent on the host and can be read)."""
        dom = self.dom
        if dom.isActive():
            dom.destroy()

    def xml(self, inactive: bool = False) -> str:
        return self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)

    # disks
    def live_sources(self) -> dict[str, str]:
        return live_sources(self.dom)

    def inactive_sources(self) -> dict[str, str]:
        return inactive_sources(self.dom)

    def alias(self, target: str) -> str:
        return disk_aliases(self.dom)[target]

    def hmp_write(self, target: str, pattern: int, offset: int, length: int, **kw) -> None:
        from .hmp import hmp_write

        hmp_write(self.dom, target, pattern, offset, length, **kw)

    def hmp_read_check(self, target: str, pattern: int, offset: int, length: int) -> bool:
        from .hmp import hmp_read_check

        return hmp_read_check(self.dom, target, pattern, offset, length)

    def has_pattern(self, target: str, pattern: int, offset: int, length: int, path: str | Path | None = None,
                    fmt: str | None = None) -> bool:
        """Guest view check on ``path`` (default: the current live/inactive source of ``target``)."""
        if path is None:
            path = self.current_source(target)
            fmt = fmt or self.current_format(target)
        return images.image_has_pattern(path, fmt, pattern, offset, length)

    def current_source(self, target: str) -> str:
        return (self.live_sources() if self.is_active() else self.inactive_sources())[target]

    def current_format(self, target: str) -> str:
        return disk_formats(self.dom, inactive=not self.is_active()).get(target, self.formats[target])

    def verify_fill(self, target: str, path: str | Path | None = None, fmt: str | None = None) -> bool:
        """True when ``path`` (default: the original image) has exactly the content the
        disk was created with (use it on restored images)."""
        spec = self.specs[target]
        if path is None:
            path, fmt = self.disks[target], self.formats[target]
        return images.verify_fill(path, fmt, spec.size_mib, spec.fill, spec.effective_seed())


def wait_state(dom: libvirt.virDomain, want: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state, _reason = dom.state()
        if state == want:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"domain {dom.name()!r} state {state}, wanted {want}")
        time.sleep(0.1)


class DomainFactory:
    """Creates test domains and removes them (and their directories) in :meth:`cleanup`."""

    def __init__(self, conn: libvirt.virConnect, image_dir: Path, run_id: str, label: str = ""):
        self.conn = conn
        self.image_dir = Path(image_dir)
        self.run_id = run_id
        self.label = _short_label(label)
        self.created: list[TestDomain] = []
        self.extra_names: list[str] = []
        self.extra_paths: list[Path] = []
        self._n = 0

    def domain_name(self, suffix: str) -> str:
        """``kbtest-<runid>-<suffix>``, removed at cleanup if a domain of that name
        exists then (use it for domains the code under test creates, e.g. restores)."""
        name = f"{DOMAIN_PREFIX}{self.run_id}-{suffix}"
        self.extra_names.append(name)
        return name

    def track_path(self, path: str | Path) -> Path:
        """Remove ``path`` (file or directory tree) at cleanup."""
        p = Path(path)
        self.extra_paths.append(p)
        return p

    def __call__(self, *args, **kwargs) -> TestDomain:
        return self.make(*args, **kwargs)

    def make(
        self,
        disks: list[DiskSpec] | None = None,
        running: bool = True,
        persistent: bool = True,
        name: str | None = None,
        memory_mib: int | None = None,
        firmware: str = "bios",
    ) -> TestDomain:
        """Create a domain.

        ``name`` is appended to the run prefix: ``kbtest-<runid>-<name>`` (spaces and
        non-ASCII are fine).  Default: ``kbtest-<runid>-<test label>-<n>``.
        """
        if disks is None:
            disks = [DiskSpec()]
        if not running and not persistent:
            raise ValueError("a transient domain must be running")
        targets = [d.target for d in disks]
        if len(set(targets)) != len(targets):
            raise ValueError(f"duplicate disk targets: {targets}")
        self._n += 1
        n = self._n
        suffix = name if name is not None else "-".join(p for p in (self.label, str(n)) if p)
        full_name = f"{DOMAIN_PREFIX}{self.run_id}-{suffix}"
        ddir = make_dir(self.image_dir / f"dom{n}")
        paths: dict[str, Path] = {}
        fmts: dict[str, str] = {}
        td = TestDomain(self.conn, full_name, ddir, paths, fmts, {d.target: d for d in disks}, persistent,
                        firmware=firmware)
        self.created.append(td)  # before anything can fail, so cleanup sees it
        for spec in disks:
            path = ddir / spec.effective_filename()
            images.create_image(path, spec.fmt, spec.size_mib, spec.fill, spec.effective_seed())
            os.chmod(path, 0o644)
            paths[spec.target] = path
            fmts[spec.target] = spec.fmt
        xml = domain_xml(
            full_name,
            {t: (paths[t], fmts[t]) for t in targets},
            vtype=virt_type(self.conn),
            memory_mib=memory_mib or (128 if firmware == "efi" else 64),
            firmware=firmware,
        )
        if persistent:
            dom = self.conn.defineXML(xml)
            if running:
                dom.create()
        else:
            dom = self.conn.createXML(xml, 0)
        if running:
            wait_state(dom, libvirt.VIR_DOMAIN_RUNNING)
        return td

    def cleanup(self) -> list[str]:
        """Remove every created domain and its directory; returns error messages."""
        errors = []
        for td in reversed(self.created):
            try:
                remove_domain(self.conn, td.name)
            except Exception as e:  # noqa: BLE001 - keep cleaning the rest
                errors.append(f"{td.name}: {e}")
            shutil.rmtree(td.dir, ignore_errors=True)
            if td.dir.exists():
                errors.append(f"{td.name}: could not remove {td.dir}")
        for name in reversed(self.extra_names):
            try:
                remove_domain(self.conn, name)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{name}: {e}")
        for p in reversed(self.extra_paths):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            if p.exists() or p.is_symlink():
                errors.append(f"could not remove {p}")
        self.created.clear()
        self.extra_names.clear()
        self.extra_paths.clear()
        return errors


def _short_label(label: str, maxlen: int = 40) -> str:
    out = "".join(c if c.isalnum() or c in "_" else "_" for c in label).strip("_")
    return out[:maxlen]
