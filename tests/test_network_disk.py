"""Network disks against the real stack: an NBD export served by `qemu-nbd` on 127.0.0.1 attached to a
running test domain beside a file disk (README "Network disks", docs/operations.md).

The promises, one test each: `method: auto` backs the network disks up with the file disk in one
pull-mode backup job, into borg and restic, reading a raw one in full every run (it holds no bitmap:
`checkpoint='no'`) while the file disk and a qcow2 network disk go incremental, and `restore --disk
vdb --to FILE` gives the served content, also after a guest write; an explicit `method: snapshot`
leaves the network disks out with a warning (exit 1) that names them; a whole-domain restore writes
a network disk into a local file, points the restored XML at it and says so. One domain and its two
exports for the module; 8 MiB disks, 256 KiB segments.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import DiskSpec, DomainFactory, make_dir, qemu_img_compare, run_cli
from harness.bitmap import KiB, MiB, archive_of, backup, disk_stats, restore_disk, short_scratch_dir
from harness.images import create_image, image_info
from support import write_config, write_passphrase

SIZE_MIB = 8
SEGMENT = 256 * KiB
SEGMENTS = SIZE_MIB * MiB // SEGMENT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_qemu_nbd(image: Path, port: int, log: Path) -> subprocess.Popen:
    """`qemu-nbd` serving the bytes of `image` (`-f raw`: a qcow2 file is served as it is, the guest's QEMU
    opens the qcow2 on top) on 127.0.0.1:`port` as export "netdisk" until stopped."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["qemu-nbd", "--persistent", "--shared=8", "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
             "-x", "netdisk", str(image)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"qemu-nbd did not listen on {port}: {log.read_text(errors='replace')}")


def network_disk_xml(target: str, fmt: str, port: int) -> ET.Element:
    return ET.fromstring(
        f"<disk type='network' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source protocol='nbd' name='netdisk'><host name='127.0.0.1' port='{port}'/></source>"
        f"<target dev='{target}' bus='virtio'/></disk>")


class Setup:
    def __init__(self, domain, served: Path, port: int, served_qcow2: Path, work: Path, scratch: Path):
        self.domain, self.served, self.port, self.work, self.scratch = domain, served, port, work, scratch
        self.served_qcow2 = served_qcow2

    def config(self, name: str, method: str, kinds: tuple[str, ...] = ("borg", "restic")) -> Path:
        """A config with a fresh repository of each of `kinds` (named after its kind), method `method`."""
        directory = make_dir(self.work / name)
        repositories = [
            {"name": "borg", "type": "borg", "path": str(directory / "borg-repo"),
             "passphrase_file": str(write_passphrase(directory / "borg.pass"))},
            {"name": "restic", "type": "restic", "url": str(directory / "restic-repo"),
             "passphrase_file": str(write_passphrase(directory / "restic.pass"))},
        ]
        repositories = [r for r in repositories if r["type"] in kinds]
        return write_config(directory / "kb", repositories, plugins=[], method=method,
                            segment_size=f"{SEGMENT // KiB}KiB", scratch_dir=str(self.scratch))


@pytest.fixture(scope="module")
def setup(libvirt_conn, run_dir, run_id):
    """A running domain: vda a qcow2 file disk, vdb a raw NBD network disk and vdc a qcow2 one, each served by
    a qemu-nbd of its own from a file."""
    work = make_dir(run_dir / f"netdisk-{secrets.token_hex(3)}")
    scratch = short_scratch_dir(run_dir)
    factory = DomainFactory(libvirt_conn, work, run_id, label="netdisk")
    served = create_image(work / "served.raw", "raw", SIZE_MIB, "pattern", seed=77)
    served_qcow2 = create_image(work / "served.qcow2", "qcow2", SIZE_MIB, "pattern", seed=78)
    servers = []
    try:
        port, qcow2_port = free_port(), free_port()
        servers.append(start_qemu_nbd(served, port, work / "qemu-nbd.log"))
        servers.append(start_qemu_nbd(served_qcow2, qcow2_port, work / "qemu-nbd-qcow2.log"))
        domain = factory.make(disks=[DiskSpec("vda", "qcow2", SIZE_MIB)], running=False,
                              name=f"netdisk-{secrets.token_hex(2)}")
        root = ET.fromstring(domain.xml(inactive=True))
        root.find("devices").append(network_disk_xml("vdb", "raw", port))
        root.find("devices").append(network_disk_xml("vdc", "qcow2", qcow2_port))
        libvirt_conn.defineXML(ET.tostring(root, encoding="unicode"))
        domain.start()
        yield Setup(domain, served, port, served_qcow2, work, scratch)
    finally:
        errors = factory.cleanup()
        for server in servers:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        assert not errors, errors


def assert_restores_served(setup: Setup, config: Path, archive: str, repository: str, tmp_path: Path) -> Path:
    """vdb restored from `archive` in `repository` equals the served file: raw, same size, same bytes; return it."""
    destination = restore_disk(config, setup.domain.name, "vdb", tmp_path / f"vdb-{repository}-{archive}.raw",
                               archive, repository)
    assert image_info(destination)["format"] == "raw"
    assert destination.stat().st_size == SIZE_MIB * MiB
    assert qemu_img_compare(destination, setup.served, "raw", "raw", strict=True), (repository, archive)
    return destination


def assert_restores_served_qcow2(setup: Setup, config: Path, archive: str, repository: str, tmp_path: Path) -> None:
    destination = restore_disk(config, setup.domain.name, "vdc", tmp_path / f"vdc-{repository}.qcow2", archive,
                               repository)
    assert image_info(destination)["format"] == "qcow2"
    assert qemu_img_compare(destination, setup.served_qcow2, "qcow2", "qcow2"), (repository, archive)
    destination.unlink()


def test_auto_backs_up_a_network_disk_in_full_each_run_beside_an_incremental_file_disk(setup, tmp_path):
    config = setup.config("auto", "auto")
    name = setup.domain.name

    first = backup(config, name)
    assert first["exit_code"] == 0, first
    assert first["method"] == "bitmap", first
    stats = disk_stats(first)
    assert sorted(stats) == ["vda", "vdb", "vdc"]  # every disk, one backup job
    assert stats["vdb"]["full_read_reason"] == "raw network disk: no bitmap"
    assert stats["vdb"]["segments_dirty"] == stats["vdb"]["segments_total"] == SEGMENTS
    before = assert_restores_served(setup, config, archive_of(first, "borg"), "borg", tmp_path)
    # The new checkpoint carries a bitmap for every qcow2 disk, local or not; a raw network disk cannot hold one.
    [checkpoint] = [c for c in setup.domain.dom.listAllCheckpoints(0) if c.getName().startswith("kvm-borg.")]
    modes = {d.get("name"): d.get("checkpoint") for d in ET.fromstring(checkpoint.getXMLDesc(0)).findall("./disks/disk")}
    assert modes == {"vda": "bitmap", "vdb": "no", "vdc": "bitmap"}, modes  # qcow2 over NBD holds one
    assert_restores_served_qcow2(setup, config, archive_of(first, "restic"), "restic", tmp_path)

    # A guest write on each disk: vda reads only what changed, vdb is read in full again.
    setup.domain.hmp_write("vdb", 0x5A, 3 * MiB + 4 * KiB, 64 * KiB)
    setup.domain.hmp_write("vda", 0x5B, 1 * MiB, 64 * KiB)
    setup.domain.hmp_write("vdc", 0x5C, 5 * MiB, 64 * KiB)
    second = backup(config, name)
    assert second["exit_code"] == 0, second
    stats = disk_stats(second)
    assert stats["vdb"]["full_read_reason"] == "raw network disk: no bitmap"
    assert stats["vdb"]["segments_dirty"] == SEGMENTS
    for target in ("vda", "vdc"):  # a file disk and a qcow2 network disk: only the written segment
        assert stats[target]["full_read_reason"] is None and stats[target]["segments_dirty"] == 1, stats[target]
    assert_restores_served_qcow2(setup, config, archive_of(second, "borg"), "borg", tmp_path)
    assert_restores_served(setup, config, archive_of(second, "restic"), "restic", tmp_path)
    # ... while the first run's archive holds the content before the write
    assert not qemu_img_compare(before, setup.served, "raw", "raw", strict=True)
    with open(before, "rb") as handle:
        handle.seek(3 * MiB + 4 * KiB)
        assert handle.read(64 * KiB) != bytes([0x5A]) * (64 * KiB)


def test_explicit_snapshot_leaves_the_network_disk_out_with_a_warning_naming_it(setup, tmp_path):
    config = setup.config("snapshot", "snapshot", ("restic",))
    result = backup(config, setup.domain.name, expect=(1,))
    assert result["method"] == "snapshot"
    assert [d["target"] for d in result["disks"]] == ["vda"]
    [warning] = [w for w in result["warnings"] if "disk vdb" in w]
    assert f"nbd://127.0.0.1:{setup.port}/netdisk" in warning and "NOT backed up" in warning
    assert "set method auto or bitmap" in warning
    assert [w for w in result["warnings"] if "disk vdc" in w and "NOT backed up" in w]
    assert "NOT backed up" in result["stderr"]
    # the archive says so too, and has no vdb to restore
    proc = run_cli("restore", setup.domain.name, "--disk", "vdb", "--to", tmp_path / "x.raw", "--repo", "restic",
                   config=config)
    assert proc.returncode == 2 and "has no disk vdb" in proc.stderr, proc.stderr
    assert setup.domain.is_active()
    live = setup.domain.live_sources()  # merged back; the network disks were never touched
    assert live["vda"] == str(setup.domain.disks["vda"]) and live["vdb"] == live["vdc"] == "netdisk", live


def test_a_whole_domain_restore_writes_the_network_disk_to_a_local_file_and_points_the_xml_at_it(setup, tmp_path):
    config = setup.config("copy", "auto", ("borg",))
    backup(config, setup.domain.name)
    target = make_dir(tmp_path / "copy")
    copy = f"{setup.domain.name}-copy"
    proc = run_cli("restore", setup.domain.name, "--target-dir", target, "--name", copy, "--repo", "borg", "--json",
                   config=config, timeout=300)
    assert proc.returncode == 1, proc.stderr  # the warning below
    result = json.loads(proc.stdout)
    local = target / f"{copy}-vdb.raw"
    assert result["disks"]["vdb"] == str(local)
    assert qemu_img_compare(local, setup.served, "raw", "raw", strict=True)
    [warning] = [w for w in result["warnings"] if "disk vdb was the network disk" in w]
    assert f"nbd://127.0.0.1:{setup.port}/netdisk" in warning and str(local) in warning
    disks = {d.find("target").get("dev"): d for d in ET.parse(result["xml"]).getroot().findall("./devices/disk")}
    assert disks["vdb"].get("type") == "file" and disks["vdb"].find("source").attrib == {"file": str(local)}
