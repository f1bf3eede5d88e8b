"""A real Linux test guest built from Debian packages only (no image download).

The guest is a Debian kernel plus a tiny initramfs: busybox, the virtio/ext4
modules, qemu-guest-agent and a static C workload (workload.c) that appends
checksummed, sequence-numbered records to /data/records.log on an ext4 data
disk (/dev/vda), fsync()ing after every record.  There is no root disk: the
initramfs *is* the root file system, so the only guest state that matters is
the data disk, which is exactly what a backup test wants.

Python stdlib only (plus the host tools apt-get, dpkg-deb, ldd, gcc, mkfs.ext4,
debugfs, e2fsck, qemu-img).  See README.md in this directory.

Public API
----------
build_guest_artifacts(cache_dir=DEFAULT_CACHE_DIR) -> GuestArtifacts
make_scratch_dir(prefix="guest-") -> Path
make_data_disk(path, size_mib=64, fmt="raw") -> Path
guest_domain_xml(name, artifacts, data_disk, data_format, console_log, memory_mib=256, ...) -> str
wait_for_agent(dom, timeout=60.0) -> float
agent_command(dom, command, arguments=None, timeout=10) -> object
agent_write_file(dom, path, data) -> None
set_freeze_hook_delay(dom, "freeze"|"thaw", ms) -> None
serial_last_seq(console_log) -> int | None
serial_errors(console_log) -> list[str]
serial_events(console_log) -> list[ConsoleEvent]   (KBSEQ/KBHOOK lines with guest mono_us)
serial_seq_times(console_log) / serial_hooks(console_log) / longest_stall(seq_times, start_us, end_us)
wait_for_progress(console_log, min_seq, timeout=60.0) -> int
read_records(image_path, replay_journal=True) -> list[Record]
check_records(records) -> RecordCheck
start_guest(conn, name, artifacts, workdir, fmt="raw", size_mib=64, ...) -> Guest
remove_guest(conn, name) -> None
wait_for_shutoff(dom, timeout=60.0) -> float
fsck_image(image_path, repair_first=True) -> FsckResult
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

HERE = Path(__file__).resolve().parent
WORKLOAD_SRC = HERE / "workload.c"

DEFAULT_CACHE_DIR = Path("/var/cache/kvm-borg-tests/guest")
# Directory for images/console logs: every component must be traversable by
# the libvirt-qemu user (pytest's tmp_path is 0700 and is NOT).
DEFAULT_SCRATCH_ROOT = Path("/var/tmp/kvm-borg-tests")

# Bump when the recipe changes in a way the file hashes below do not capture.
RECIPE_VERSION = "1"

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"

# Modules the guest needs; dependencies come from each module's .modinfo
# "depends=" (the same data depmod writes to modules.dep; the Debian package
# does not ship modules.dep, depmod generates it in postinst).
WANTED_MODULES = ["virtio_pci", "virtio_blk", "virtio_console", "ext4"]
# softdep aliases ("softdep=pre: crypto-crc32c") -> module providing them.
SOFTDEP_ALIASES = {"crypto-crc32c": "crc32c_generic", "crc32c": "crc32c_generic"}

AGENT_PORT_NAME = "org.qemu.guest_agent.0"
# qemu-ga runs this around fsfreeze; it is the workload binary, which prints
# "KBHOOK freeze|thaw <mono_us>" when invoked under this name.
FREEZE_HOOK = "/etc/qemu/fsfreeze-hook"

# Record format, mirrored from workload.c.
RECORD_SIZE = 64
RECORD_MAGIC = b"KBR1"
_PAYLOAD_OFF = 24
_CRC_OFF = 60

_SEQ_RE = re.compile(rb"KBSEQ (\d+)")
_SEQ_TIME_RE = re.compile(rb"KBSEQ (\d+) (\d+)\r?\n")
_HOOK_RE = re.compile(rb"KBHOOK (\w+) (\d+)\r?\n")
# Everything ordered as it appeared on the console (the workload and the hook share it).
_EVENT_RE = re.compile(rb"(KBSEQ|KBHOOK) (\w+) (\d+)\r?\n")
_ERR_RE = re.compile(rb"KBERR ([^\r\n]*)")


# --------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestArtifacts:
    kernel: Path
    initrd: Path
    # Informational: e.g. {"kernel_package": "linux-image-6.1.0-56-amd64", ...}
    manifest: dict = dataclasses.field(default_factory=dict, compare=False)


def _recipe_key() -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    for p in (Path(__file__).resolve(), WORKLOAD_SRC):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.CalledProcessError as e:
        out = (e.stdout or b"")[-2000:]
        err = (e.stderr or b"")[-2000:]
        raise RuntimeError(
            f"command failed ({e.returncode}): {' '.join(cmd)}\nstdout: {out!r}\nstderr: {err!r}"
        ) from e


def _apt_download(packages: list[str], dest: Path) -> list[Path]:
    """apt-get download into dest (host is not modified); apt-get update once on failure."""
    before = set(dest.glob("*.deb"))
    cmd = ["apt-get", "download", "-q", *packages]
    try:
        _run(cmd, cwd=dest)
    except RuntimeError:
        _run(["apt-get", "update", "-q"])
        _run(cmd, cwd=dest)
    by_name = {_deb_field(d, "Package"): d for d in set(dest.glob("*.deb")) - before}
    try:
        return [by_name[p] for p in packages]
    except KeyError:
        raise RuntimeError(f"apt-get download {packages} produced {sorted(by_name)}") from None


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).stdout.decode().strip()


def _dep_names(depends: str) -> list[str]:
    # "libc6 (>= 2.34), libglib2.0-0 (>= 2.63.3) | foo" -> ["libc6", "libglib2.0-0"]
    names = []
    for part in depends.split(","):
        alt = part.split("|")[0].strip()
        if alt:
            names.append(alt.split()[0].split(":")[0])
    return names


def _modinfo(path: Path) -> dict[str, list[str]]:
    """Parse the .modinfo section of an (uncompressed) ELF64 kernel module."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise RuntimeError(f"{path}: not an ELF64 module (compressed modules are not supported)")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    stroff = secs[shstrndx][4]
    info: dict[str, list[str]] = {}
    for s in secs:
        name = data[stroff + s[0] : data.index(b"\0", stroff + s[0])]
        if name == b".modinfo":
            for item in data[s[4] : s[4] + s[5]].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


def _module_load_order(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """Topologically sorted .ko paths for `wanted` and everything they need."""
    index: dict[str, Path] = {}
    for ko in (moddir / "kernel").rglob("*.ko"):
        index.setdefault(ko.stem.replace("-", "_"), ko)
    order: list[Path] = []
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done":
            return
        if state.get(name) == "busy":
            raise RuntimeError(f"module dependency cycle at {name}")
        if name not in index:
            raise RuntimeError(f"module {name} not found under {moddir} (built in?)")
        state[name] = "busy"
        info = _modinfo(index[name])
        deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
        for sd in info.get("softdep", []):
            # "pre: a b post: c" -> only "pre" matters for load order.
            m = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", sd)
            for alias in (m.group(1).split() if m else []):
                if alias in SOFTDEP_ALIASES:
                    deps.append(SOFTDEP_ALIASES[alias])
                elif alias.replace("-", "_") in index:
                    deps.append(alias)
        for d in deps:
            visit(d)
        state[name] = "done"
        order.append(index[name])

    for w in wanted:
        visit(w)
    return order


def _elf_libs(binary: Path, lib_path: str | None = None) -> tuple[list[Path], list[str]]:
    """(resolved library paths, missing sonames) according to ldd."""
    env = dict(os.environ)
    if lib_path:
        env["LD_LIBRARY_PATH"] = lib_path
    out = _run(["ldd", str(binary)], env=env).stdout.decode()
    found, missing = [], []
    for line in out.splitlines():
        line = line.strip()
        if "=> not found" in line:
            missing.append(line.split()[0])
        elif "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target:
                found.append(Path(target))
        elif line.startswith("/"):  # the dynamic loader
            found.append(Path(line.split()[0]))
    return found, missing


class _Cpio:
    """Minimal cpio 'newc' writer (what the kernel's initramfs unpacker reads)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self.names:
            raise ValueError(f"duplicate initramfs entry {name}")
        self.names.add(name)
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08x" % f for f in fields)
        self.buf.write(hdr + nb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self.names:
                self._entry(sub, stat.S_IFDIR | mode)

    def _parent(self, name: str) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.dir(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.names.discard("TRAILER!!!")
        return self.buf.getvalue()


INIT_SCRIPT = r"""#!/bin/sh
# kvm-borg test guest /init (busybox sh, PID 1). Generated by tests/guest/build.py.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp /data
log() { echo "KBINIT $(cut -d' ' -f1 /proc/uptime) $*"; }

INTERVAL=20 EVERY=1 WORKLOAD=1 AGENT=1
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kb.interval_ms=*) INTERVAL="${arg#*=}" ;;
    kb.print_every=*) EVERY="${arg#*=}" ;;
    kb.noworkload) WORKLOAD=0 ;;
    kb.noagent) AGENT=0 ;;
  esac
done

for m in @MODULES@; do
  insmod "/lib/modules/$m.ko" || log "insmod $m failed"
done
log "modules loaded"

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
  if [ -e /sys/block/vda/dev ]; then
    IFS=: read maj min < /sys/block/vda/dev; mknod /dev/vda b "$maj" "$min"
  fi
  sleep 0.1; i=$((i+1))
done
if mount -t ext4 /dev/vda /data; then log "data mounted"; else log "mount /dev/vda failed"; fi

# qemu-ga: find its virtio-serial port by name (no udev here).
PORT=
i=0
while [ -z "$PORT" ] && [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    if [ "$(cat "$p/name")" = "@AGENT_PORT@" ]; then
      PORT="${p##*/}"
      if [ ! -c "/dev/$PORT" ]; then
        IFS=: read maj min < "$p/dev"; mknod "/dev/$PORT" c "$maj" "$min"
      fi
    fi
  done
  [ -n "$PORT" ] || sleep 0.1
  i=$((i+1))
done
if [ "$AGENT" = 0 ]; then
  log "agent not started (kb.noagent)"
elif [ -n "$PORT" ]; then
  # No -d: it would need a pidfile dir and exits silently without one.
  # -F: run /etc/qemu/fsfreeze-hook (the workload binary) around fsfreeze.
  qemu-ga -m virtio-serial -p "/dev/$PORT" -t /run -f /run/qemu-ga.pid -F@FREEZE_HOOK@ < /dev/null &
  echo $! > /run/agent.pid  # qemu-ga writes its -f pidfile only with -d
  log "agent started on /dev/$PORT"
else
  log "agent port @AGENT_PORT@ not found"
fi

if [ "$WORKLOAD" = 1 ]; then
  workload /data/records.log "$INTERVAL" "$EVERY" < /dev/null &
  echo $! > /run/workload.pid
  log "workload started"
fi

# PID 1 must never exit: reap children forever.
while true; do wait; sleep 5; done
"""

# qemu-ga's guest-shutdown runs "/sbin/shutdown -h -P|-H|-r +0 <msg>" and wants
# exit status 0, so do the real work in the background.
SHUTDOWN_SCRIPT = r"""#!/bin/sh
ACTION=poweroff
for a in "$@"; do [ "$a" = -r ] && ACTION=reboot; [ "$a" = -H ] && ACTION=halt; done
(
  sleep 0.5
  [ -f /run/workload.pid ] && kill -TERM "$(cat /run/workload.pid)" 2>/dev/null
  sleep 0.5
  sync
  umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
  echo "KBINIT shutdown: $ACTION"
  $ACTION -f
) < /dev/null > /dev/console 2>&1 &
exit 0
"""


def _build(cache_dir: Path, key: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        debs = work / "debs"
        debs.mkdir()
        manifest: dict[str, Any] = {"key": key}

        # 1. kernel: the meta package only depends on the real one.
        (meta,) = _apt_download([KERNEL_META_PACKAGE], debs)
        kpkg = next(n for n in _dep_names(_deb_field(meta, "Depends")) if n.startswith("linux-image-"))
        kdeb, bbdeb, gadeb = _apt_download([kpkg, BUSYBOX_PACKAGE, AGENT_PACKAGE], debs)
        for deb in (kdeb, bbdeb, gadeb):
            manifest[_deb_field(deb, "Package")] = _deb_field(deb, "Version")
        manifest["kernel_package"] = kpkg
        kroot, bbroot, garoot = work / "kernel", work / "busybox", work / "agent"
        for deb, root in ((kdeb, kroot), (bbdeb, bbroot), (gadeb, garoot)):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        (vmlinuz,) = list((kroot / "boot").glob("vmlinuz-*"))
        kver = vmlinuz.name[len("vmlinuz-") :]
        manifest["kernel_version"] = kver
        modules = _module_load_order(kroot / "lib" / "modules" / kver, WANTED_MODULES)
        manifest["modules"] = [m.stem for m in modules]

        # 2. workload, static.
        wl = work / "workload"
        _run(["gcc", "-static", "-O2", "-Wall", "-o", str(wl), str(WORKLOAD_SRC)])

        # 3. qemu-ga from the extracted deb + its shared libraries. ldd resolves
        # them against the host (libvirt/qemu already pull in glib, libudev,
        # liburing, libnuma); if any are missing, the Depends packages are
        # downloaded and extracted too and searched first.
        qga = garoot / "usr" / "sbin" / "qemu-ga"
        libs, missing = _elf_libs(qga)
        if missing:
            depdebs = _apt_download(_dep_names(_deb_field(gadeb, "Depends")), debs)
            sysroot = work / "agent-deps"
            for d in depdebs:
                _run(["dpkg-deb", "-x", str(d), str(sysroot)])
            lp = ":".join(str(sysroot / p) for p in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
            libs, missing = _elf_libs(qga, lp)
            if missing:
                raise RuntimeError(f"qemu-ga libraries not found: {missing}")
        manifest["agent_libs"] = [str(p) for p in libs]

        # 4. initramfs.
        bb = bbroot / "bin" / "busybox"
        cpio = _Cpio()
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "data",
                  "etc", "lib/modules", "lib/x86_64-linux-gnu", "lib64", "var"):
            cpio.dir(d)
        cpio.symlink("var/run", "/run")
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("init", INIT_SCRIPT.replace("@MODULES@", " ".join(m.stem for m in modules))
                  .replace("@AGENT_PORT@", AGENT_PORT_NAME).replace("@FREEZE_HOOK@", FREEZE_HOOK).encode(), 0o755)
        cpio.file("sbin/shutdown", SHUTDOWN_SCRIPT.encode(), 0o755)
        cpio.file("bin/busybox", bb.read_bytes(), 0o755)
        cpio.file("usr/bin/workload", wl.read_bytes(), 0o755)
        cpio.symlink(FREEZE_HOOK, "/usr/bin/workload")  # workload.c's hook mode (argv[0])
        cpio.file("usr/sbin/qemu-ga", qga.read_bytes(), 0o755)
        for lib in libs:
            real = lib.resolve()
            dest = "lib64/" + lib.name if lib.name.startswith("ld-linux") else "lib/x86_64-linux-gnu/" + lib.name
            cpio.file(dest, real.read_bytes(), 0o755)
        for m in modules:
            cpio.file(f"lib/modules/{m.stem}.ko", m.read_bytes())
        cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        applets = _run([str(bb), "--list-full"]).stdout.decode().split()
        for a in applets:
            if a.strip("/") not in cpio.names:
                cpio.symlink(a, "/bin/busybox")
        initrd_data = gzip.compress(cpio.finish(), compresslevel=6, mtime=0)

        # 5. publish atomically.
        kernel_out, initrd_out = cache_dir / "vmlinuz", cache_dir / "initrd.img"
        for src_bytes, dest in ((vmlinuz.read_bytes(), kernel_out), (initrd_data, initrd_out)):
            tmp = work / (dest.name + ".new")
            tmp.write_bytes(src_bytes)
            tmp.chmod(0o644)
            os.replace(tmp, dest)
        stamp = cache_dir / "manifest.json"
        tmp = work / "manifest.json"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, stamp)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _make_dirs_traversable(path: Path, mode: int = 0o755) -> None:
    """mkdir -p, and make sure every component is o+x so libvirt-qemu can reach it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    for p in path.parents:
        try:
            st = p.stat()
        except OSError:
            continue
        if not st.st_mode & stat.S_IXOTH:
            raise PermissionError(f"{p} is not traversable by other users (mode {oct(st.st_mode)})")


def build_guest_artifacts(cache_dir: Path = DEFAULT_CACHE_DIR) -> GuestArtifacts:
    """Return the guest kernel + initramfs, building them (~30 s) if the cache is stale.

    The cache key is a hash of RECIPE_VERSION, this file and workload.c.  A
    newer Debian kernel is only picked up when the key changes (or the cache
    directory is removed).  Safe against concurrent callers (flock).
    """
    cache_dir = Path(cache_dir)
    _make_dirs_traversable(cache_dir)
    key = _recipe_key()
    kernel, initrd, stamp = cache_dir / "vmlinuz", cache_dir / "initrd.img", cache_dir / "manifest.json"

    def cached() -> GuestArtifacts | None:
        try:
            manifest = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("key") == key and kernel.is_file() and initrd.is_file():
            return GuestArtifacts(kernel, initrd, manifest)
        return None

    hit = cached()
    if hit:
        return hit
    with open(cache_dir / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        hit = cached()
        if hit:
            return hit
        manifest = _build(cache_dir, key)
        return GuestArtifacts(kernel, initrd, manifest)


# --------------------------------------------------------------------------
# Disks and domain XML
# --------------------------------------------------------------------------


def make_scratch_dir(prefix: str = "guest-", root: Path = DEFAULT_SCRATCH_ROOT) -> Path:
    """A fresh 0755 directory that QEMU (running as libvirt-qemu) can reach.

    Caller deletes it (shutil.rmtree).
    """
    _make_dirs_traversable(root)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    d.chmod(0o755)
    return d


def make_data_disk(path: Path, size_mib: int = 64, fmt: str = "raw") -> Path:
    """Create `path` holding a fresh, empty ext4 file system (label kbdata).

    fmt is "raw" or "qcow2" (made by converting the raw image).  The parent
    directory must be reachable by libvirt-qemu (see make_scratch_dir).
    """
    if fmt not in ("raw", "qcow2"):
        raise ValueError(f"unsupported format {fmt!r}")
    path = Path(path)
    raw = path if fmt == "raw" else path.with_name(path.name + ".raw-tmp")
    try:
        with open(raw, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        # No lazy init: the guest kernel would otherwise zero inode tables in
        # the background, adding writes that have nothing to do with the test.
        _run(["mkfs.ext4", "-q", "-F", "-L", "kbdata",
              "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)])
        if fmt == "qcow2":
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    finally:
        if raw != path:
            raw.unlink(missing_ok=True)
    path.chmod(0o644)
    return path


def _xml_escape(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


def guest_domain_xml(
    name: str,
    artifacts: GuestArtifacts,
    data_disk: Path,
    data_format: str,
    console_log: Path,
    memory_mib: int = 256,
    *,
    interval_ms: int = 20,
    print_every: int = 1,
    workload: bool = True,
    agent: bool = True,
    disk_alias: str = "ua-data",
    extra_cmdline: str = "",
) -> str:
    """libvirt XML for a TCG guest booting `artifacts` with `data_disk` as vda.

    Always <domain type='qemu'> (TCG): under nested KVM here this kernel hangs
    early.  The serial console goes to `console_log` (read it with
    serial_last_seq / wait_for_progress); the agent channel is
    org.qemu.guest_agent.0 on a libvirt-managed unix socket.  No network.
    agent=False keeps the channel but does not start qemu-ga in the guest
    (kb.noagent): libvirt then says "QEMU guest agent is not connected".
    """
    cmdline = f"console=ttyS0 quiet kb.interval_ms={int(interval_ms)} kb.print_every={int(print_every)}"
    if not workload:
        cmdline += " kb.noworkload"
    if not agent:
        cmdline += " kb.noagent"
    if extra_cmdline:
        cmdline += " " + extra_cmdline
    e = _xml_escape
    return f"""<domain type='qemu'>
  <name>{e(name)}</name>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{e(str(artifacts.kernel))}</kernel>
    <initrd>{e(str(artifacts.initrd))}</initrd>
    <cmdline>{e(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{e(data_format)}'/>
      <source file='{e(str(data_disk))}'/>
      <target dev='vda' bus='virtio'/>
      <alias name='{e(disk_alias)}'/>
    </disk>
    <controller type='usb' model='none'/>
    <channel type='unix'>
      <target type='virtio' name='{AGENT_PORT_NAME}'/>
    </channel>
    <serial type='file'>
      <source path='{e(str(console_log))}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# --------------------------------------------------------------------------
# Agent and serial console helpers
# --------------------------------------------------------------------------


def agent_command(dom: Any, command: str, arguments: dict | None = None, timeout: int = 10) -> Any:
    """Run a guest agent command through libvirt; returns the decoded "return" value."""
    import libvirt_qemu  # noqa: PLC0415 (only the helpers need libvirt)

    msg: dict[str, Any] = {"execute": command}
    if arguments is not None:
        msg["arguments"] = arguments
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), timeout, 0)
    return json.loads(reply).get("return")


def agent_write_file(dom: Any, path: str, data: bytes, timeout: int = 10) -> None:
    """Write `data` to `path` inside the guest (guest-file-open/write/close)."""
    import base64  # noqa: PLC0415

    handle = agent_command(dom, "guest-file-open", {"path": path, "mode": "w"}, timeout)
    try:
        agent_command(dom, "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()},
                      timeout)
    finally:
        agent_command(dom, "guest-file-close", {"handle": handle}, timeout)


def set_freeze_hook_delay(dom: Any, action: str, ms: int) -> None:
    """Make the guest's fsfreeze hook sleep `ms` before "freeze" (i.e. before FIFREEZE) or "thaw"."""
    if action not in ("freeze", "thaw"):
        raise ValueError(action)
    agent_write_file(dom, f"/run/kb-hook-sleep-{action}", f"{int(ms)}\n".encode())


def wait_for_agent(dom: Any, timeout: float = 60.0) -> float:
    """Wait until guest-ping answers; returns the seconds waited.

    Until qemu-ga opens its port, libvirt reports the agent as not connected
    (channel state='disconnected' in the live XML) and the ping fails fast.
    """
    import libvirt  # noqa: PLC0415

    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < timeout:
        try:
            agent_command(dom, "guest-ping", timeout=5)
            return time.monotonic() - start
        except libvirt.libvirtError as exc:
            last = exc
            if not dom.isActive():
                raise RuntimeError(f"domain {dom.name()} stopped while waiting for the agent") from exc
        time.sleep(0.5)
    raise TimeoutError(f"guest agent of {dom.name()} not answering after {timeout}s: {last}")


def _read_console(console_log: Path) -> bytes:
    try:
        return Path(console_log).read_bytes()
    except FileNotFoundError:
        return b""


def serial_last_seq(console_log: Path) -> int | None:
    """The last "KBSEQ n" the workload printed, or None."""
    data = _read_console(console_log)
    # Fast path: the tail usually has it.
    for chunk in (data[-65536:], data):
        hits = _SEQ_RE.findall(chunk)
        if hits:
            return int(hits[-1])
    return None


def serial_errors(console_log: Path) -> list[str]:
    """All "KBERR ..." lines of the workload."""
    return [m.decode(errors="replace") for m in _ERR_RE.findall(_read_console(console_log))]


@dataclasses.dataclass(frozen=True)
class ConsoleEvent:
    """One timed console line: ("seq", n, t) for "KBSEQ n t", ("hook", "freeze"|"thaw", t) for "KBHOOK".

    mono_us is the guest's CLOCK_MONOTONIC in microseconds (it restarts at every boot).
    """

    kind: str
    value: int | str
    mono_us: int


def serial_events(console_log: Path) -> list[ConsoleEvent]:
    """Timed KBSEQ and KBHOOK lines in console order (only complete lines)."""
    out = []
    for kind, value, t in _EVENT_RE.findall(_read_console(console_log)):
        if kind == b"KBSEQ":
            out.append(ConsoleEvent("seq", int(value), int(t)))
        else:
            out.append(ConsoleEvent("hook", value.decode(), int(t)))
    return out


def serial_seq_times(console_log: Path) -> list[tuple[int, int]]:
    """(seq, guest mono_us when the record was durable) for every timed KBSEQ line."""
    return [(int(s), int(t)) for s, t in _SEQ_TIME_RE.findall(_read_console(console_log))]


def serial_hooks(console_log: Path) -> list[tuple[str, int]]:
    """(action, guest mono_us) of every qemu-ga fsfreeze hook run: "freeze" before FIFREEZE, "thaw" after FITHAW."""
    return [(a.decode(), int(t)) for a, t in _HOOK_RE.findall(_read_console(console_log))]


@dataclasses.dataclass(frozen=True)
class Stall:
    """The longest wait between two consecutive durable records (includes the workload's interval)."""

    gap_us: int
    after_seq: int  # the last record durable before the gap
    start_us: int
    end_us: int


def longest_stall(seq_times: list[tuple[int, int]], start_us: int | None = None,
                  end_us: int | None = None) -> Stall | None:
    """The longest gap between consecutive records that overlaps [start_us, end_us] (guest mono us).

    None when no pair of consecutive records overlaps the window.
    """
    best = None
    for (s1, t1), (s2, t2) in zip(seq_times, seq_times[1:]):
        if s2 <= s1 or t2 < t1:  # a reboot restarted the sequence or the clock
            continue
        if (start_us is not None and t2 < start_us) or (end_us is not None and t1 > end_us):
            continue
        if best is None or t2 - t1 > best.gap_us:
            best = Stall(t2 - t1, s1, t1, t2)
    return best


def console_tail(console_log: Path, n: int = 2000) -> str:
    return _read_console(console_log)[-n:].decode(errors="replace")


def wait_for_progress(console_log: Path, min_seq: int, timeout: float = 60.0) -> int:
    """Wait until the workload reported seq >= min_seq; returns that seq."""
    deadline = time.monotonic() + timeout
    while True:
        seq = serial_last_seq(console_log)
        if seq is not None and seq >= min_seq:
            return seq
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"workload reached seq {seq}, wanted >= {min_seq} within {timeout}s; "
                f"console tail:\n{console_tail(console_log)}"
            )
        time.sleep(0.2)


# --------------------------------------------------------------------------
# Guest lifecycle
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Guest:
    dom: Any  # libvirt.virDomain
    name: str
    data_disk: Path
    data_format: str
    console_log: Path
    started_at: float | None = None  # time.monotonic() just before dom.create()


def start_guest(
    conn: Any,
    name: str,
    artifacts: GuestArtifacts,
    workdir: Path,
    fmt: str = "raw",
    size_mib: int = 64,
    *,
    data_disk: Path | None = None,
    start: bool = True,
    **xml_kwargs: Any,
) -> Guest:
    """Make a data disk in workdir (unless data_disk is given), define `name`, start it.

    workdir must be reachable by libvirt-qemu (make_scratch_dir, or the
    harness's image_dir).  Pair with remove_guest(conn, name) in a finally.
    Does not wait for the agent: call wait_for_agent(guest.dom).
    """
    workdir = Path(workdir)
    if data_disk is None:
        data_disk = make_data_disk(workdir / f"{name}-data.{fmt}", size_mib, fmt)
    console_log = workdir / f"{name}-console.log"
    xml = guest_domain_xml(name, artifacts, data_disk, fmt, console_log, **xml_kwargs)
    dom = conn.defineXML(xml)
    guest = Guest(dom, name, Path(data_disk), fmt, console_log)
    if start:
        guest.started_at = time.monotonic()
        try:
            dom.create()
        except Exception:
            remove_guest(conn, name)
            raise
    return guest


def remove_guest(conn: Any, name: str) -> None:
    """Destroy (if running) and undefine `name`; quiet if it is already gone."""
    import libvirt  # noqa: PLC0415

    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    flags = 0
    for f in ("VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA",
              "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_NVRAM"):
        flags |= getattr(libvirt, f, 0)
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isPersistent():
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError:
                dom.undefine()


def wait_for_shutoff(dom: Any, timeout: float = 60.0) -> float:
    """Wait until the domain is no longer running; returns the seconds waited."""
    start = time.monotonic()
    while dom.isActive():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{dom.name()} still running after {timeout}s")
        time.sleep(0.2)
    return time.monotonic() - start


@dataclasses.dataclass(frozen=True)
class FsckResult:
    clean: bool  # `e2fsck -fn` found nothing after the optional replay/repair pass
    repair_rc: int | None  # exit code of `e2fsck -fy` (None if not run; 0/1 are fine)
    check_rc: int
    output: str


def fsck_image(image_path: Path, repair_first: bool = True) -> FsckResult:
    """e2fsck a temporary raw copy of an image (raw or qcow2); the image is untouched.

    repair_first runs `e2fsck -fy` before the read-only `e2fsck -fn` check: after
    a hard power-off the journal must be replayed first, which -n cannot do.
    """
    with _raw_copy(Path(image_path)) as raw:
        out = []
        repair_rc = None
        if repair_first:
            p = subprocess.run(["e2fsck", "-fy", str(raw)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            repair_rc = p.returncode
            out.append(p.stdout.decode(errors="replace"))
        p = subprocess.run(["e2fsck", "-fn", str(raw)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out.append(p.stdout.decode(errors="replace"))
        return FsckResult(p.returncode == 0, repair_rc, p.returncode, "\n".join(out))


# --------------------------------------------------------------------------
# Reading records back out of an image
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Record:
    index: int  # position in the file (offset // RECORD_SIZE)
    seq: int | None  # None if the record is too short to hold one
    time_ns: int | None
    complete: bool  # all RECORD_SIZE bytes present
    valid: bool  # complete, magic/size/payload/CRC all correct


@dataclasses.dataclass(frozen=True)
class RecordCheck:
    count: int  # valid records in the gap-free prefix
    last_seq: int | None
    gap_free: bool  # records 0..count-1 in order, all valid (a torn tail excluded)
    torn_tail: bool  # exactly the last record is partial/invalid (acceptable after a crash)
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.gap_free and not self.errors


def _expected_payload(seq: int) -> bytes:
    return bytes((seq * 31 + i) & 0xFF for i in range(_CRC_OFF - _PAYLOAD_OFF))


def parse_records(data: bytes) -> list[Record]:
    out = []
    for index, off in enumerate(range(0, len(data), RECORD_SIZE)):
        r = data[off : off + RECORD_SIZE]
        complete = len(r) == RECORD_SIZE
        seq = struct.unpack_from("<Q", r, 8)[0] if len(r) >= 16 else None
        tns = struct.unpack_from("<Q", r, 16)[0] if len(r) >= 24 else None
        valid = (
            complete
            and r[:4] == RECORD_MAGIC
            and struct.unpack_from("<I", r, 4)[0] == RECORD_SIZE
            and struct.unpack_from("<I", r, _CRC_OFF)[0] == zlib.crc32(r[:_CRC_OFF])
            and r[_PAYLOAD_OFF:_CRC_OFF] == _expected_payload(seq)
        )
        out.append(Record(index, seq, tns, complete, valid))
    return out


def _image_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


@contextlib.contextmanager
def _raw_copy(image_path: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kb-records-") as td:
        raw = Path(td) / "disk.raw"
        _run(["qemu-img", "convert", "-f", _image_format(image_path), "-O", "raw", str(image_path), str(raw)])
        yield raw


def read_records(image_path: Path, replay_journal: bool = True, path_in_fs: str = "/records.log") -> list[Record]:
    """Read the workload's records from an ext4 image (raw or qcow2) without mounting.

    The image is converted to a temporary raw copy (the original is never
    modified).  With replay_journal (default), `e2fsck -E journal_only` replays
    the ext4 journal on the copy first: after a hard power-off the newest
    metadata (inode size, extents) may only be in the journal, and debugfs
    alone would then show a shorter (still valid) prefix.
    Raises FileNotFoundError if the file does not exist in the file system.
    """
    with _raw_copy(Path(image_path)) as raw:
        if replay_journal:
            p = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(raw)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if p.returncode >= 4:
                raise RuntimeError(f"e2fsck journal replay failed ({p.returncode}): {p.stdout!r} {p.stderr!r}")
        out = raw.parent / "records.log"
        p = _run(["debugfs", "-R", f"dump {path_in_fs} {out}", str(raw)])
        if not out.exists():
            raise FileNotFoundError(f"{path_in_fs} not in {image_path}: {p.stderr.decode(errors='replace')}")
        return parse_records(out.read_bytes())


def check_records(records: list[Record]) -> RecordCheck:
    """Check that records form a gap-free prefix 0..n-1 with valid checksums.

    An invalid or partial *last* record is reported as torn_tail (acceptable
    after a crash) and not counted; anything else wrong is an error.
    """
    errors: list[str] = []
    torn = False
    count = 0
    in_prefix = True
    for r in records:
        if r.valid and r.seq == r.index:
            if in_prefix:
                count += 1
            continue
        if r.index == len(records) - 1 and in_prefix:
            torn = True
            continue
        in_prefix = False
        if r.valid:
            errors.append(f"record at index {r.index} has seq {r.seq}")
        else:
            errors.append(f"record at index {r.index} is corrupt (seq field {r.seq})")
        if len(errors) >= 20:
            errors.append("... (more errors omitted)")
            break
    return RecordCheck(
        count=count,
        last_seq=count - 1 if count else None,
        gap_free=not errors,
        torn_tail=torn,
        errors=tuple(errors),
    )
