"""Archives of the `segments` layout (the bitmap method) restore, verify and stay refused when hostile, from
real borg and restic repositories.

The archives are built for real: a directory of segment files (`%08d`, 256 KiB, 0-byte files for
all-zero segments) and a manifest.json per disk, beside a meta.json made by kvm_borg.metadata.build_meta
from a bitmap FreezeResult and a domain XML, stored by the real backend's `store()` (borg create,
restic backup) exactly as a backup stores its ArchiveRequest. Then the CLI restores them.
Two disks: vda, a 64 MiB qcow2 original (restored as qcow2: converted), and vdb, a raw one whose size
is not a multiple of the segment size (restored as raw, the short last segment).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import stat
import subprocess
import tempfile
import sys
import uuid as uuid_module
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import make_dir, run_cli
from harness.crafted import kvm_borg_timestamp, unique_timestamp
from kvm_borg import metadata
from kvm_borg.backends.borg.repository import BorgRepository
from kvm_borg.backends.restic.repository import ResticRepository
from kvm_borg.models import ArchiveRequest, DiskPlan, DomainPlan, FreezeResult, FrozenDisk
from support import cli_env, write_config, write_passphrase

SEG = 256 << 10
MIB = 1 << 20
DISKS = {"vda": ("qcow2", 64 * MIB), "vdb": ("raw", 3 * MIB + 4096)}
HOST = os.uname().nodename


def reference_image(path: Path, size: int, seed: int) -> Path:
    """Write a raw image of `size` bytes: random data in some segments, whole zero segments, segments
    half data half zeros, and a short tail; return its path."""
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for index in range(-(-size // SEG)):
            kind = index % 5
            start = index * SEG
            length = min(SEG, size - start)
            if kind in (1, 3):  # all zeros: a 0-byte segment file
                continue
            data = rng.randbytes(length if kind != 4 else length // 2)
            handle.seek(start)
            handle.write(data)
    return path


def write_segments(image: Path, directory: Path, target: str, fmt: str) -> int:
    """Cut a raw image into `directory` as the view shows a disk: segment files (0 bytes when all zeros) and
    manifest.json; return the segment count."""
    directory.mkdir(parents=True)
    size = image.stat().st_size
    count = -(-size // SEG)
    with open(image, "rb") as handle:
        for index in range(count):
            data = handle.read(SEG)
            (directory / f"{index:08d}").write_bytes(b"" if not data.strip(b"\0") else data)
    (directory / "manifest.json").write_text(json.dumps({
        "kvm_borg_segments": 1, "target": target, "virtual_size": size, "segment_size": SEG,
        "segment_count": count, "format": fmt}))
    return count


def domain_xml(name: str, uuid: str) -> str:
    disks = "".join(f"""
    <disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>
      <source file='/var/lib/libvirt/images/{name}-{target}.{fmt}'/><target dev='{target}' bus='virtio'/></disk>"""
                    for target, (fmt, _size) in DISKS.items())
    return f"""<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{disks}</devices></domain>"""


@dataclass
class Source:
    """The module's domain as a bitmap backup would have seen it: reference images and the place of the view."""

    name: str
    uuid: str
    work: Path
    config: Path
    references: dict[str, Path]
    repositories: dict[str, dict]
    archives: dict[str, str] | None = None
    small: dict[str, Path] | None = None  # small images of the same two disks, for the hostile archives


def store_segmented(source: Source, kind: str, *, host: str = HOST, edit=None, references=None) -> str:
    """Build a segmented archive of `source` (its view and staging directories under a fresh root) and store it
    into the `kind` repository through the backend's own store(); `edit(view_dir)` may spoil the segment
    directories first; `references` ({target: raw image}) replaces the source's disks. Return the archive name."""
    references = references or source.references
    timestamp = kvm_borg_timestamp(unique_timestamp())
    archive = metadata.archive_name(source.name, timestamp)
    root = make_dir(source.work / f"build-{secrets.token_hex(4)}")
    view = root / "view" / source.uuid
    staging = root / "staging" / source.uuid
    staging.mkdir(parents=True)
    frozen = []
    for target, (fmt, _size) in DISKS.items():
        size = references[target].stat().st_size
        count = write_segments(references[target], view / target, target, fmt)
        frozen.append(FrozenDisk(target, str(view / target), fmt, size, f"/var/lib/libvirt/images/{target}.{fmt}",
                                 layout="segments", segment_size=SEG, segment_count=count))
    if edit is not None:
        edit(view)
    plan = DomainPlan(source.name, source.uuid, True,
                      tuple(DiskPlan(d.target, d.original_source, "file", d.driver_type) for d in frozen), (), {},
                      "off", method="bitmap")
    freeze = FreezeResult(frozen, quiesced=False, consistency="crash-consistent", method="bitmap")
    meta = metadata.build_meta(plan, freeze, archive=archive, timestamp=timestamp, host=host,
                               libvirt_version="9.0.0", qemu_version="7.2.0", persistent=True,
                               staging_dir=str(staging), has_live_xml=False)
    (staging / "meta.json").write_text(json.dumps(meta))
    (staging / "domain.xml").write_text(domain_xml(source.name, source.uuid))
    files = metadata.archive_files(meta, str(staging))
    settings = SimpleNamespace(hostname=host, borg_binary=None, restic_binary=None, progress=False)
    repository = dict(source.repositories[kind])
    backend = (BorgRepository if kind == "borg" else ResticRepository)(repository, settings)
    result = backend.store(ArchiveRequest(source.name, archive, timestamp, tuple(files), (),
                                          metadata.archive_comment(meta), 0))
    assert result.ok, result.error
    shutil.rmtree(root)
    return archive


@pytest.fixture(scope="module")
def source(run_dir, run_id, tmp_path_factory):
    work = make_dir(run_dir / f"segrestore-{secrets.token_hex(3)}")
    tmp = tmp_path_factory.mktemp("segrestore")
    repositories = {
        "borg": {"name": "borg", "type": "borg", "path": str(tmp / "borg-repo"),
                 "passphrase_file": str(write_passphrase(tmp / "borg.pass"))},
        "restic": {"name": "restic", "type": "restic", "url": str(tmp / "restic-repo"),
                   "passphrase_file": str(write_passphrase(tmp / "restic.pass"))},
    }
    config = write_config(work / "kb", list(repositories.values()))
    references = {target: reference_image(work / f"reference-{target}.raw", size, seed)
                  for seed, (target, (_fmt, size)) in enumerate(DISKS.items())}
    name = f"kbtest-{run_id}-segrestore"
    src = Source(name, str(uuid_module.uuid4()), work, config, references, repositories)
    src.archives = {kind: store_segmented(src, kind) for kind in ("borg", "restic")}
    src.small = {target: reference_image(work / f"small-{target}.raw", size, seed)
                 for seed, (target, size) in enumerate({"vda": MIB, "vdb": SEG + 4096}.items())}
    yield src
    shutil.rmtree(work, ignore_errors=True)


def restore(source: Source, kind: str, archive: str, *args, host: str | None = None):
    return run_cli("restore", source.name, "--repo", kind, "--archive", archive, *args,
                   *(("--host", host) if host else ()), config=source.config, env=cli_env())


def image_info(path: Path, fmt: str) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)], check=True,
                                     capture_output=True, text=True).stdout)


def same_content(reference: Path, image: Path, fmt: str) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(reference), str(image)]
                          ).returncode == 0


def assert_restored(source: Source, directory: Path, stem: str) -> None:
    vda, vdb = directory / f"{stem}-vda.qcow2", directory / f"{stem}-vdb.raw"
    info = image_info(vda, "qcow2")
    assert info["format"] == "qcow2" and info["virtual-size"] == DISKS["vda"][1]
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert "backing-filename" not in info  # flat
    assert same_content(source.references["vda"], vda, "qcow2")
    assert vdb.read_bytes() == source.references["vdb"].read_bytes()
    for path in (vda, vdb):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    # sparse: the zero segments (2 of every 5) are holes in the raw image and unallocated in the qcow2
    assert vdb.stat().st_blocks * 512 < DISKS["vdb"][1] * 0.8
    assert vda.stat().st_blocks * 512 < DISKS["vda"][1] * 0.8
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]  # no temporary file left


# --- restore ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["borg", "restic"])
def test_a_segmented_archive_restores_flat_in_the_original_formats(source, kind, tmp_path):
    target = tmp_path / "restored"
    proc = restore(source, kind, source.archives[kind], "--name", "segcopy", "--target-dir", str(target), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["disks"] == {"vda": str(target / "segcopy-vda.qcow2"), "vdb": str(target / "segcopy-vdb.raw")}
    assert_restored(source, target, "segcopy")
    xml = (target / "segcopy.xml").read_text()
    assert f"file='{target}/segcopy-vda.qcow2'" in xml.replace('"', "'") and "type='qcow2'" in xml.replace('"', "'")


def test_one_segmented_disk_to_a_file_keeps_its_format(source, tmp_path):
    out = tmp_path / "vda.qcow2"
    proc = restore(source, "borg", source.archives["borg"], "--disk", "vda", "--to", str(out))
    assert proc.returncode == 0, proc.stderr
    assert image_info(out, "qcow2")["format"] == "qcow2" and same_content(source.references["vda"], out, "qcow2")


def test_one_segmented_disk_to_stdout_is_its_raw_content(source):
    cmd = [str(Path(sys.executable).parent / "kvm-borg"), "--config", str(source.config), "restore", source.name,
           "--repo", "restic", "--archive", source.archives["restic"], "--disk", "vdb", "--to", "-"]
    streamed = subprocess.run(cmd, capture_output=True, env={**os.environ, **cli_env()}, stdin=subprocess.DEVNULL)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == source.references["vdb"].read_bytes()


def test_a_segmented_archive_of_another_host_restores_with_its_host_name(source, tmp_path):
    archive = store_segmented(source, "restic", host="other-hv")
    target = tmp_path / "restored"
    proc = restore(source, "restic", archive, "--name", "fromother", "--target-dir", str(target), host="other-hv")
    assert proc.returncode == 0, proc.stderr
    assert_restored(source, target, "fromother")


def test_verify_restores_a_segmented_archive_and_checks_every_disk(source):
    proc = run_cli("verify", source.name, "--repo", "borg", "--archive", source.archives["borg"], "--json",
                   config=source.config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and set(report["disks"]) == {"vda", "vdb"}
    assert report["disks"]["vda"]["check"] == "no errors" and report["disks"]["vda"]["format"] == "qcow2"
    assert report["disks"]["vdb"]["virtual_size"] == DISKS["vdb"][1]


# --- hostile segment directories ------------------------------------------------------------------------
# Each hostile archive spoils both disks differently; each disk is restored alone (--disk X --to FILE).


def symlinked_segment(view: Path) -> None:  # vda
    segment = view / "vda" / "00000002"
    segment.unlink()
    segment.symlink_to("/etc/shadow")


def short_segment(view: Path) -> None:  # vdb
    segment = view / "vdb" / "00000000"
    segment.write_bytes(segment.read_bytes()[:-512])


def extra_file(view: Path) -> None:  # vda
    (view / "vda" / "00000099").write_bytes(b"x" * SEG)


def missing_manifest(view: Path) -> None:  # vdb
    (view / "vdb" / "manifest.json").unlink()


HOSTILE = {
    "symlink+short": ((symlinked_segment, short_segment),
                      {"vda": "00000002' (a symlink) in the segment directory; refused",
                       "vdb": "holds 261632 bytes, not 262144 (or 0); refused"}),
    "extra+no-manifest": ((extra_file, missing_manifest),
                          {"vda": "00000099' (a regular file) in the segment directory; refused",
                           "vdb": "has no manifest.json; refused"}),
}


@pytest.mark.parametrize("kind, case", [("borg", "symlink+short"), ("restic", "extra+no-manifest")])
def test_a_hostile_segment_directory_is_one_line_exit_2_and_nothing_written(source, kind, case, tmp_path):
    edits, messages = HOSTILE[case]
    archive = store_segmented(source, kind, edit=lambda view: [edit(view) for edit in edits], references=source.small)
    for target, message in messages.items():
        out = tmp_path / f"{target}.img"
        proc = restore(source, kind, archive, "--disk", target, "--to", str(out))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("kvm-borg: error: ") and message in last, proc.stderr
        assert list(tmp_path.iterdir()) == []  # nothing at the destination, no temporary file beside it


# --- mount -------------------------------------------------------------------------------------------------


def ext4_image(path: Path, size: int, files: dict[str, bytes]) -> Path:
    """Write a raw image of `size` bytes holding an ext4 file system (no partition table) with `files`."""
    tree = path.with_suffix(".tree")
    tree.mkdir()
    for name, data in files.items():
        (tree / name).write_bytes(data)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path), str(size // 1024) + "k"], check=True,
                   capture_output=True)
    shutil.rmtree(tree)
    return path


def test_mount_shows_a_flat_image_per_segmented_disk_and_the_file_system_in_it(source, tmp_path):
    secret = secrets.token_bytes(300 * 1024)
    references = {"vda": source.small["vda"], "vdb": ext4_image(source.work / f"ext4-{secrets.token_hex(3)}.raw",
                                                               8 * MIB, {"hello.txt": b"hello\n", "blob": secret})}
    archive = store_segmented(source, "borg", references=references)
    mountpoint = tmp_path / "mnt"
    proc = run_cli("mount", source.name, str(mountpoint), "--repo", "borg", "--archive", archive, "--json",
                   config=source.config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    try:
        result = json.loads(proc.stdout)
        assert result["images"] == {"vda": str(mountpoint / "images" / "vda.raw"),
                                    "vdb": str(mountpoint / "images" / "vdb.raw")}
        assert (mountpoint / "images" / "vda.raw").read_bytes() == references["vda"].read_bytes()
        assert result["filesystems"]["vdb"]["type"] == "ext4"
        assert (mountpoint / "vdb" / "hello.txt").read_bytes() == b"hello\n"
        assert (mountpoint / "vdb" / "blob").read_bytes() == secret
    finally:
        down = run_cli("umount", str(mountpoint), config=source.config, env=cli_env())
    assert down.returncode == 0, down.stderr
    assert not mountpoint.exists() or list(mountpoint.iterdir()) == []
    assert str(mountpoint) not in Path("/proc/self/mountinfo").read_text()


# --- from a real bitmap backup -----------------------------------------------------------------------------


def test_a_real_bitmap_backup_restores_equal_to_the_guest_view_full_and_incremental(domain_factory, run_dir, tmp_path):
    from harness import DiskSpec

    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 4)])
    state = domain_factory.track_path(tempfile.mkdtemp(prefix="rs", dir=run_dir))  # short: the NBD socket path
    state.chmod(0o711)
    repositories = [
        {"name": "borg", "type": "borg", "path": str(tmp_path / "borg-repo"),
         "passphrase_file": str(write_passphrase(tmp_path / "borg.pass"))},
        {"name": "restic", "type": "restic", "url": str(tmp_path / "restic-repo"),
         "passphrase_file": str(write_passphrase(tmp_path / "restic.pass"))},
    ]
    config = write_config(tmp_path / "kb", repositories, state_dir=str(state), method="bitmap", segment_size="256KiB")

    def backup() -> tuple[dict, dict]:
        proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)["domains"][0]
        return result["disks"][0], {s["repository"]: s["archive"] for s in result["stores"]}

    def restored(kind: str, archive: str) -> Path:
        target = tmp_path / f"{kind}-{archive}"
        proc = run_cli("restore", domain.name, "--repo", kind, "--archive", archive, "--name", "bmcopy",
                       "--target-dir", str(target), config=config, env=cli_env())
        assert proc.returncode == 0, proc.stderr
        return target / "bmcopy-vda.qcow2"

    first, archives = backup()
    assert first["segments_total"] == 16 and first["full_read_reason"]
    for kind, archive in archives.items():
        image = restored(kind, archive)
        assert image_info(image, "qcow2")["format"] == "qcow2" and domain.verify_fill("vda", image, "qcow2")
    domain.hmp_write("vda", 0x5A, 5 * SEG + 4096, 64 << 10)
    second, archives = backup()
    assert (second["segments_dirty"], second["full_read_reason"]) == (1, None)
    for kind, archive in archives.items():
        image = restored(kind, archive)
        assert domain.has_pattern("vda", 0x5A, 5 * SEG + 4096, 64 << 10, path=image, fmt="qcow2")
        assert subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "qcow2",
                               domain.current_source("vda"), str(image)]).returncode == 0


def test_a_segmented_raw_disk_goes_into_a_block_device_and_a_qcow2_one_is_refused(source, tmp_path):
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xee" * (DISKS["vdb"][1] + SEG))  # old content the zero segments must overwrite
    device = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        proc = restore(source, "borg", source.archives["borg"], "--disk", "vdb", "--to", device, "--overwrite")
        assert proc.returncode == 0, proc.stderr
        with open(device, "rb") as handle:
            assert handle.read(DISKS["vdb"][1]) == source.references["vdb"].read_bytes()
        proc = restore(source, "borg", source.archives["borg"], "--disk", "vda", "--to", device, "--overwrite")
        assert proc.returncode == 2 and "a block device takes segmented raw disks only" in proc.stderr
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
