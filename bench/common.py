"""What every benchmark needs: a reference domain with a real file system, timing, sizes, guest writes."""

from __future__ import annotations

import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt

VENV_BIN = Path(sys.executable).parent
BORG = str(VENV_BIN / "borg")
KVM_BORG = str(VENV_BIN / "kvm-borg")
RESTIC = shutil.which("restic") or "restic"
SOURCE_TREES = ("/usr/lib", "/usr/share")
MiB = 1 << 20
KiB = 1 << 10
# Marks a directory as a benchmark's own scratch space: only such a directory is ever removed.
WORKDIR_MARK = ".kvm-borg-bench"


def run(*argv, env=None, cwd=None, ok=(0, 1)) -> subprocess.CompletedProcess:
    """Run a command, fail loudly on an exit code not in `ok`; return the CompletedProcess (text)."""
    proc = subprocess.run([str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode not in ok:
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
    disk_bytes: int = 0  # virtual size
    fmt: str = "qcow2"


def prepare_workdir(workdir: Path) -> Path:
    """Given a scratch directory, empty it if it is a benchmark's own (marked), create it 0755; return it.

    A directory that exists without the mark is refused: it may be anything of the user's."""
    if workdir.exists():
        if not (workdir / WORKDIR_MARK).exists():
            raise SystemExit(f"{workdir} exists and is not a benchmark work directory "
                             f"(no {WORKDIR_MARK} in it): choose another --workdir or remove it")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    os.chmod(workdir, 0o755)  # QEMU (libvirt-qemu) must reach the images
    (workdir / WORKDIR_MARK).write_text(f"{os.getpid()}\n")
    return workdir


def remove_workdir(workdir: Path) -> None:
    """Remove a benchmark's scratch directory (only if it carries the mark)."""
    if (workdir / WORKDIR_MARK).exists():
        shutil.rmtree(workdir, ignore_errors=True)


def build_reference_domain(conn: libvirt.virConnect, workdir: Path, name: str, data_mib: int,
                           disk_mib: int, fmt: str = "qcow2") -> ReferenceDomain:
    """Create and start a domain whose disk (qcow2 or raw) holds an ext4 file system of real host files."""
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    tree = workdir / "tree"
    data = copy_real_files(tree, data_mib * MiB)
    raw = workdir / "disk.raw"
    run("mkfs.ext4", "-q", "-F", "-d", tree, raw, f"{disk_mib}M")
    shutil.rmtree(tree)
    if fmt == "qcow2":
        disk = workdir / "disk.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk)
        raw.unlink()
    else:
        disk = raw
    xml = f"""<domain type='{virt_type()}'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk></devices></domain>"""
    dom = conn.defineXML(xml)
    dom.create()
    return ReferenceDomain(name, disk, workdir, data, disk_mib * MiB, fmt)


def remove_domain(conn: libvirt.virConnect, name: str, attempts: int = 5) -> None:
    """Destroy and undefine domain `name` (quiet if there is none); retry, since a busy host can make
    libvirt fail to terminate QEMU in time; raise if the domain is still there after `attempts`."""
    flags = 0
    for flag in ("VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA",
                 "VIR_DOMAIN_UNDEFINE_NVRAM"):
        flags |= getattr(libvirt, flag, 0)
    error = None
    for attempt in range(attempts):
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            error = exc
            time.sleep(1 + attempt)
    raise RuntimeError(f"domain {name} could not be removed: {error}")


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


# --- sizes ---------------------------------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    """Given a file or directory, return the apparent size of every regular file in it (0 if absent)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def allocated_bytes(path: Path) -> int:
    """Given a file, return the bytes its blocks take on disk (holes excluded)."""
    return os.stat(path).st_blocks * 512


def evict_cache(path: Path) -> None:
    """Given a file or a directory, write its dirty pages and drop all its pages from the page cache.

    Every measured run starts cold: borg drops what it reads from the cache itself
    (POSIX_FADV_DONTNEED), so a warm cache could not be kept equal for every variant."""
    path = Path(path)
    files = [path] if path.is_file() else [Path(root, name) for root, _dirs, names in os.walk(path) for name in names]
    for name in files:
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- writes through the running VM's block layer ----------------------------------------------


def disk_alias(dom: libvirt.virDomain, target: str = "vda") -> str:
    """Given a running domain and a disk target, return the disk's device alias from the live XML."""
    for disk in ET.fromstring(dom.XMLDesc(0)).iter("disk"):
        element = disk.find("target")
        alias = disk.find("alias")
        if element is not None and element.get("dev") == target and alias is not None:
            return alias.get("name")
    raise RuntimeError(f"domain {dom.name()} has no live disk {target}")


def qemu_io(dom: libvirt.virDomain, alias: str, command: str) -> None:
    """Given a running domain, a disk alias and a qemu-io command, run it on the disk's active layer (HMP)."""
    import libvirt_qemu

    reply = libvirt_qemu.qemuMonitorCommand(
        dom, f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "{command}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if reply.strip():  # qemu-io prints to QEMU's log; a reply is an error of the monitor
        raise RuntimeError(f"qemu-io {command!r} on {dom.name()}: {reply.strip()}")


def make_patterns(directory: Path, count: int, size: int, seed: int) -> list[Path]:
    """Write `count` files of `size` pseudo-random bytes (from `seed`) into `directory`, readable by QEMU.

    Random, so written blocks neither compress nor deduplicate, like real new data; several, because
    qemu-io fills every write from the start of its pattern file."""
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o755)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        path = directory / f"pattern-{seed}-{index}"
        path.write_bytes(rng.randbytes(size))
        os.chmod(path, 0o644)
        paths.append(path)
    return paths


def write_extents(dom: libvirt.virDomain, extents: list[tuple[int, int]], patterns: list[Path],
                  target: str = "vda", piece: int = 64 * MiB) -> None:
    """Given (offset, length) extents, write them through the guest's disk in writes of at most `piece`
    bytes, each filled from the next of `patterns` in turn, then flush."""
    alias = disk_alias(dom, target)
    turn = 0
    for offset, length in extents:
        done = 0
        while done < length:
            size = min(piece, length - done)
            qemu_io(dom, alias, f"write -q -s {patterns[turn % len(patterns)]} {offset + done} {size}")
            turn += 1
            done += size
    qemu_io(dom, alias, "flush")


def scattered_extents(disk_bytes: int, fraction: float, unit: int, seed: int) -> list[tuple[int, int]]:
    """Given a disk size, a fraction of its `unit`-sized blocks and a seed, return the blocks chosen at
    random as (offset, length) extents, adjacent blocks merged."""
    units = disk_bytes // unit
    chosen = sorted(random.Random(seed).sample(range(units), round(units * fraction)))
    extents: list[tuple[int, int]] = []
    for index in chosen:
        offset = index * unit
        if extents and extents[-1][0] + extents[-1][1] == offset:
            extents[-1] = (extents[-1][0], extents[-1][1] + unit)
        else:
            extents.append((offset, unit))
    return extents
