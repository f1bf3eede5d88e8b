"""What every benchmark needs: a reference domain with a real file system, timing, reports."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

VENV_BIN = Path(sys.executable).parent
BORG = str(VENV_BIN / "borg")
KVM_BORG = str(VENV_BIN / "kvm-borg")
SOURCE_TREES = ("/usr/lib", "/usr/share")
MiB = 1 << 20


def run(*argv, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run a command, fail loudly; return the CompletedProcess (text)."""
    proc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def timed(fn) -> float:
    """Call fn() and return the wall-clock seconds it took."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def copy_real_files(destination: Path, budget_bytes: int) -> int:
    """Copy regular files from /usr/lib and /usr/share into `destination` until `budget_bytes`; return bytes."""
    copied = 0
    for tree in SOURCE_TREES:
        for root, dirs, files in os.walk(tree):
            dirs.sort()
            for name in sorted(files):
                source = Path(root) / name
                if source.is_symlink() or not source.is_file():
                    continue
                size = source.stat().st_size
                if copied + size > budget_bytes:
                    return copied
                target = destination / source.relative_to("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                copied += size
    return copied


def virt_type() -> str:
    """'kvm' when QEMU (libvirt-qemu) can open /dev/kvm, else 'qemu' (TCG)."""
    try:
        return "kvm" if os.stat("/dev/kvm").st_mode & 0o066 else "qemu"
    except FileNotFoundError:
        return "qemu"


@dataclass
class ReferenceDomain:
    name: str
    disk: Path
    workdir: Path
    data_bytes: int


def build_reference_domain(conn: libvirt.virConnect, workdir: Path, name: str, data_mib: int,
                           disk_mib: int) -> ReferenceDomain:
    """Create and start a domain whose qcow2 disk holds an ext4 file system of real host files."""
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    tree = workdir / "tree"
    data = copy_real_files(tree, data_mib * MiB)
    raw = workdir / "disk.raw"
    run("mkfs.ext4", "-q", "-F", "-d", tree, raw, f"{disk_mib}M")
    shutil.rmtree(tree)
    disk = workdir / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk)
    raw.unlink()
    xml = f"""<domain type='{virt_type()}'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk></devices></domain>"""
    dom = conn.defineXML(xml)
    dom.create()
    return ReferenceDomain(name, disk, workdir, data)


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    dom.undefine()


def machine_description(conn: libvirt.virConnect) -> str:
    """One line describing the host: CPU, cores, memory, virtualization, versions."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    borg = run(BORG, "--version").stdout.strip()
    lib = conn.getLibVersion()
    qemu = conn.getVersion()
    return (f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, {platform.system()} {platform.release()}, "
            f"{virt_type()} guests, libvirt {lib // 1000000}.{lib // 1000 % 1000}, "
            f"QEMU {qemu // 1000000}.{qemu // 1000 % 1000}, {borg}")


def median(values: list[float]) -> float:
    return statistics.median(values)
