"""Helpers of the bitmap-method tests: a reference model of the guest view, runs, restores, leftovers.

The model (:class:`DiskModel`) keeps a raw file beside a running test domain's disk and applies every
write to both: to the VM through HMP ``qemu-io`` (the guest's own block layer) and to the file with
plain ``pwrite``. The test domains have no OS, so nothing else writes: between two writes the file IS
the guest view, exactly, and :meth:`DiskModel.at_instant` copies it as the reference of a backup
taken at that moment. Segment arithmetic (which segments a write touches) is done here on purpose
without importing the product's ``kvm_borg.segments``: the tests check the product, not themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from .cli import BORG_BIN, RESTIC_BIN, borg_env, restic_env, run_cli
from .hmp import hmp_write
from .images import QEMU_IMG, image_info, qemu_img_compare

KiB = 1 << 10
MiB = 1 << 20
SEGMENT_SIZE = 256 * KiB  # the tests' segment_size: 64 MiB disks -> 256 segments, each run takes seconds


def bitmap_settings(segment_size: int = SEGMENT_SIZE, **more) -> dict:
    """Given a segment size in bytes and more config keys, return the config keys of a bitmap-method run."""
    return {"method": "bitmap", "segment_size": f"{segment_size // KiB}KiB", **more}


def short_scratch_dir(run_dir: Path) -> Path:
    """Given the run's QEMU-reachable directory, return a new, short scratch_dir below it (0755): the NBD
    socket `<scratch_dir>/<uuid>/nbd.sock` must fit in 107 bytes, which a per-test directory
    named after a long test does not. The caller removes it (see the modules' `scratch` fixtures)."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="s", dir=run_dir))
    directory.chmod(0o755)
    return directory


def touched_segments(offset: int, length: int, segment_size: int = SEGMENT_SIZE) -> set[int]:
    """Given a write's byte range, return the indexes of the segments it touches."""
    return set(range(offset // segment_size, (offset + length - 1) // segment_size + 1))


def segment_count(virtual_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    return -(-virtual_size // segment_size)


# --- the reference model -------------------------------------------------------------------------


@dataclass
class DiskModel:
    """The guest view of one disk of a running OS-less test domain, kept as a raw file.

    Write through :meth:`write` only. `dirty` collects the segments written since :meth:`take_dirty`."""

    domain: object  # harness TestDomain
    target: str
    reference: Path
    segment_size: int = SEGMENT_SIZE
    dirty: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, domain, target: str, workdir: Path, segment_size: int = SEGMENT_SIZE) -> "DiskModel":
        """Given a test domain nobody writes to yet, one of its disk targets and a directory, return the
        model, starting from the disk's current guest view (`qemu-img convert -U` to raw)."""
        workdir.mkdir(parents=True, exist_ok=True)
        reference = workdir / f"{target}.model.raw"
        source = domain.current_source(target)
        fmt = domain.current_format(target)
        subprocess.run([QEMU_IMG, "convert", "-U", "-f", fmt, "-O", "raw", source, str(reference)], check=True,
                       capture_output=True)
        return cls(domain, target, reference, segment_size)

    @property
    def virtual_size(self) -> int:
        return self.reference.stat().st_size

    def write(self, pattern: int, offset: int, length: int) -> None:
        """Write byte `pattern` to [offset, offset+length) through the running VM, and into the model."""
        hmp_write(self.domain.dom, self.target, pattern, offset, length)
        self.apply(pattern, offset, length)

    def apply(self, pattern: int, offset: int, length: int) -> None:
        """Apply a write that reached the disk another way (qemu-io on a shut-off image) to the model."""
        with open(self.reference, "r+b") as handle:
            handle.seek(offset)
            handle.write(bytes([pattern]) * length)
        self.dirty |= touched_segments(offset, length, self.segment_size)

    def resize(self, new_size: int) -> None:
        """The disk grew to `new_size` bytes (the new part reads as zeros)."""
        os.truncate(self.reference, new_size)

    def at_instant(self, destination: Path) -> Path:
        """Copy the model as it is now (the reference of a backup taken now) to `destination`; return it."""
        subprocess.run(["cp", "--sparse=always", str(self.reference), str(destination)], check=True)
        return destination

    def take_dirty(self) -> set[int]:
        """Return the segments written since the last call, and forget them."""
        dirty, self.dirty = self.dirty, set()
        return dirty


# --- runs -----------------------------------------------------------------------------------------


def backup(config: Path, name: str, *args: str, expect: tuple[int, ...] = (0,), env: dict | None = None) -> dict:
    """Run `kvm-borg backup NAME --json ARGS` (`env` added to the environment; configs of these tests load
    no test plugin); assert its exit code is in `expect`; return the domain's JSON result (with
    "exit_code" and "stderr" added)."""
    proc = run_cli("backup", name, "--json", *args, config=config, env=env, timeout=300)
    assert proc.returncode in expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout, proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    result["exit_code"] = proc.returncode
    result["stderr"] = proc.stderr
    return result


def disk_stats(result: dict) -> dict[str, dict]:
    """Given a domain's backup JSON result, return its per-disk read stats by target."""
    return {d["target"]: d for d in result["disks"]}


def archive_of(result: dict, repository: str | None = None) -> str:
    """Given a domain's backup JSON result, return the archive stored in `repository` (default: the only one)."""
    stores = [s for s in result["stores"] if repository is None or s["repository"] == repository]
    assert len(stores) == 1 and stores[0]["ok"], result["stores"]
    return stores[0]["archive"]


def restore_disk(config: Path, name: str, target: str, destination: Path, archive: str | None = None,
                 repository: str | None = None) -> Path:
    """`kvm-borg restore NAME --disk TARGET --to DESTINATION [--archive A] [--repo R]`; return DESTINATION."""
    args = ["--disk", target, "--to", destination, "--json"]
    args += ["--archive", archive] if archive else []
    args += ["--repo", repository] if repository else []
    proc = run_cli("restore", name, *args, config=config, timeout=300)
    assert proc.returncode == 0, f"restore exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert json.loads(proc.stdout)["disks"] == {target: str(destination)}
    return destination


def assert_restores_to(config: Path, name: str, target: str, reference: Path, workdir: Path, *,
                       archive: str | None = None, repository: str | None = None, fmt: str = "qcow2") -> None:
    """The disk `target` restored from `archive` (in `repository`) is exactly `reference` (raw), in its
    original format `fmt` and with the reference's virtual size."""
    destination = workdir / f"restored-{target}-{archive or 'latest'}-{repository or 'first'}-{time.monotonic_ns()}"
    restore_disk(config, name, target, destination, archive, repository)
    info = image_info(destination)
    assert info["format"] == fmt, info
    assert info["virtual-size"] == reference.stat().st_size, (info["virtual-size"], reference.stat().st_size)
    assert qemu_img_compare(destination, reference, fmt, "raw", strict=False), (
        f"{target} of {archive or 'latest'} in {repository or 'the first repository'} differs from {reference}")
    destination.unlink()


def list_archives(config: Path, name: str) -> list[dict]:
    """`kvm-borg list NAME --json`."""
    proc = run_cli("list", name, "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- the repositories' own view -------------------------------------------------------------------


def segment_files(paths, target: str) -> set[int]:
    """Given archive paths, return the indexes of segment files of disk `target` among them
    (`.../<target>/NNNNNNNN`)."""
    out = set()
    for path in paths:
        parent, _, leaf = str(path).rstrip("/").rpartition("/")
        if parent.rsplit("/", 1)[-1] == target and len(leaf) >= 8 and leaf.isdigit():
            out.add(int(leaf))
    return out


def borg_changed_paths(repo: Path, older: str, newer: str) -> list[str]:
    """Paths whose CONTENT differs between two archives of a borg repository (`borg diff --content-only
    --json-lines`)."""
    proc = subprocess.run([str(BORG_BIN), "diff", "--content-only", "--json-lines", f"{repo}::{older}", newer],
                          capture_output=True, text=True, env=borg_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["path"] for line in proc.stdout.splitlines() if line.strip()]


def restic_snapshot_id(url: str, archive: str) -> str:
    """The id of the restic snapshot tagged `archive=ARCHIVE`."""
    proc = subprocess.run([str(RESTIC_BIN), "-r", url, "snapshots", "--json", "--tag", f"archive={archive}"],
                          capture_output=True, text=True, env=restic_env(), check=True, stdin=subprocess.DEVNULL)
    [snapshot] = json.loads(proc.stdout)
    return snapshot["id"]


def restic_changed_paths(url: str, older: str, newer: str) -> list[str]:
    """Paths restic reports modified ("M") between the snapshots of two archives (`restic diff`)."""
    ids = [restic_snapshot_id(url, a) for a in (older, newer)]
    proc = subprocess.run([str(RESTIC_BIN), "-r", url, "diff", *ids], capture_output=True, text=True,
                          env=restic_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return [line[1:].strip() for line in proc.stdout.splitlines() if line.startswith("M ")]


def repository_check(kind: str, location: str | Path) -> subprocess.CompletedProcess:
    """`borg check REPO` or `restic check` on `location`; return the CompletedProcess."""
    if kind == "borg":
        argv, env = [str(BORG_BIN), "check", str(location)], borg_env()
    else:
        argv, env = [str(RESTIC_BIN), "-r", str(location), "check"], restic_env()
    return subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600)


# --- what a run must never leave behind -----------------------------------------------------------


def own_checkpoints(dom) -> list[str]:
    """The names of the domain's `kvm-borg.*` checkpoints."""
    return sorted(c.getName() for c in dom.listAllCheckpoints(0) if c.getName().startswith("kvm-borg."))


def all_checkpoints(dom) -> list[str]:
    return sorted(c.getName() for c in dom.listAllCheckpoints(0))


def job_active(dom) -> bool:
    """True when libvirt reports a job (a backup job) on a running domain."""
    if not dom.isActive():
        return False
    return dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE


def fuse_mounts_below(directory: Path) -> list[str]:
    """FUSE mount points at or below `directory` (segment views left mounted)."""
    root = str(Path(directory).resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _source, point, fs_type = line.split()[:3]
        point = point.replace("\\040", " ")
        if fs_type.startswith("fuse") and (point == root or point.startswith(root + "/")):
            found.append(point)
    return found


def view_processes(directory: Path) -> list[int]:
    """Pids of `python -m kvm_borg.segment_view SPEC` processes whose spec lies below `directory`."""
    root = str(Path(directory).resolve())
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if "kvm_borg.segment_view" in argv and any(a.startswith(root + "/") for a in argv):
            pids.append(int(pid))
    return pids


def files_below(directory: Path | None) -> list[Path]:
    if directory is None or not Path(directory).exists():
        return []
    return [p for p in Path(directory).rglob("*") if not p.is_dir()]


def journal_entries(state_dir: Path) -> list[Path]:
    journal = Path(state_dir) / "journal"
    return sorted(journal.glob("*.json")) if journal.exists() else []


def leftovers(dom, state_dir: Path, scratch_dir: Path | None = None) -> list[str]:
    """Given a domain and a config's state_dir (and scratch_dir, default state_dir/scratch), return what a
    finished or recovered bitmap run must not leave: a backup job, a journal entry, scratch files, a
    mounted view, a view process, a paused guest, or a `kvm-borg.*` checkpoint other than the one the
    state file is relative to. Empty: clean."""
    state_dir = Path(state_dir)
    scratch_dir = Path(scratch_dir) if scratch_dir else state_dir / "scratch"
    problems = []
    if job_active(dom):
        problems.append(f"a job is active on {dom.name()}: {dom.jobInfo()}")
    problems += [f"journal entry {p}" for p in journal_entries(state_dir)]
    problems += [f"scratch file {p}" for p in files_below(scratch_dir)]
    problems += [f"mounted {p}" for p in fuse_mounts_below(state_dir) + fuse_mounts_below(scratch_dir)]
    problems += [f"view process {pid}" for pid in view_processes(state_dir) + view_processes(scratch_dir)]
    if dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        problems.append(f"{dom.name()} is paused: {dom.state()}")
    own = own_checkpoints(dom)
    if len(own) > 1:
        problems.append(f"more than one kvm-borg checkpoint: {own}")
    elif own:
        state = state_checkpoint(state_dir, dom.UUIDString())
        if state != own[0]:
            problems.append(f"checkpoint {own[0]} is not the one the state is relative to ({state})")
    return problems


def state_checkpoint(state_dir: Path, uuid: str) -> str | None:
    """The checkpoint kvm-borg's bitmap state for domain `uuid` is relative to (kvm_borg.segment_state)."""
    from kvm_borg import segment_state

    state = segment_state.load(Path(state_dir), uuid)
    return state.checkpoint if state is not None else None


# --- faults ---------------------------------------------------------------------------------------


def qemu_pid(name: str) -> int:
    """The pid of the QEMU process libvirt runs for domain `name`."""
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def kill_qemu(dom) -> None:
    """SIGKILL the domain's QEMU (a crash: its persistent bitmaps stay marked in-use, i.e. inconsistent),
    and wait until libvirt sees it shut off."""
    pid = qemu_pid(dom.name())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while dom.isActive():
        assert time.monotonic() < deadline, f"{dom.name()} still active after SIGKILL of its QEMU {pid}"
        time.sleep(0.1)


def usable_bitmaps(image: Path) -> list[str]:
    """Names of the qcow2's persistent bitmaps NOT flagged in-use. Measured on QEMU 7.2: a bitmap is written
    into the image only when QEMU closes it (also on `virsh destroy`'s SIGTERM); after a SIGKILL a bitmap
    that existed when QEMU opened the image is left in-use, one created since (a new checkpoint) is absent."""
    info = image_info(image, "qcow2")
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return [b["name"] for b in bitmaps if "in-use" not in b.get("flags", [])]


def qemu_io_offline(image: Path, fmt: str, pattern: int, offset: int, length: int) -> None:
    """Write byte `pattern` at [offset, offset+length) into a shut-off domain's image with qemu-io."""
    proc = subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern:#04x} {offset} {length}", str(image)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and f"wrote {length}/{length}" in proc.stdout, proc.stdout + proc.stderr


def copy_file(source: Path, destination: Path) -> Path:
    shutil.copyfile(source, destination)
    return destination
