"""`kvm-borg restore` when things go wrong or the destination is special, against real libvirtd + QEMU + borg:
a failing --define/--start, an unfinished journal entry, `--to` a block device, backing chains with
recorded formats."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import xml.etree.ElementTree as ET

import libvirt

from harness import DiskSpec, create_image, domain_xml, make_dir, qemu_img_compare, run_cli, virt_type
from harness.images import image_info
from kvm_borg import journal
from kvm_borg.restore_plan import safe_file_name
from support import cli_env, write_config
from test_restic_backend import loop_device

MiB = 1 << 20


def backup(domain_name: str, config, warnings_ok: bool = False) -> str:
    proc = run_cli("backup", domain_name, "--json", config=config, env=cli_env())
    assert proc.returncode in ((0, 1) if warnings_ok else (0,)), proc.stderr
    return json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]


def restore(*args, config):
    return run_cli("restore", *args, config=config, env=cli_env())


def one_line_error(proc, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kvm-borg: error: "), proc.stderr
    for word in words:
        assert word in last, (word, last)
    return last


def add_interface_on_missing_network(conn, domain, network: str) -> None:
    """Redefine the (shut-off) domain with an interface on a network that does not exist: start fails."""
    root = ET.fromstring(domain.xml(inactive=True))
    interface = ET.SubElement(root.find("devices"), "interface", type="network")
    ET.SubElement(interface, "source", network=network)
    ET.SubElement(interface, "model", type="virtio")
    conn.defineXML(ET.tostring(root, encoding="unicode"))


def test_a_failing_start_keeps_the_data_and_undefines_only_what_the_restore_defined(domain_factory, image_dir,
                                                                                     tmp_path, libvirt_conn):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 8)], running=False, name="start fails")
    missing = f"{domain.name}-no-such-net".replace(" ", "-")
    add_interface_on_missing_network(libvirt_conn, domain, missing)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    backup(domain.name, config, warnings_ok=True)  # warns about the missing network

    # A copy: defined by this restore, so undefined again; its files stay.
    copy = domain_factory.domain_name("start fails copy")
    target = image_dir / "copy"
    proc = restore(domain.name, "--name", copy, "--target-dir", target, "--start", config=config)
    last = one_line_error(proc, f"cannot start domain {copy!r}", "kept")
    assert missing in last
    try:
        libvirt_conn.lookupByName(copy)
        raise AssertionError(f"{copy} is still defined")
    except libvirt.libvirtError:
        pass
    stem = safe_file_name(copy)
    assert sorted(p.name for p in target.iterdir()) == sorted([f"{stem}-vda.qcow2", f"{stem}.xml"])
    assert domain.verify_fill("vda", target / f"{stem}-vda.qcow2", "qcow2")

    # In place over the pre-existing domain: it stays defined (with the restored definition).
    proc = restore(domain.name, "--overwrite", "--start", config=config)
    one_line_error(proc, f"cannot start domain {domain.name!r}", "kept")
    assert libvirt_conn.lookupByName(domain.name).UUIDString() == domain.dom.UUIDString()
    assert not domain.is_active()
    assert domain.verify_fill("vda")


def test_in_place_overwrite_is_refused_while_the_journal_has_an_unfinished_entry(domain_factory, image_dir,
                                                                                 tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8)], running=False, name="journal pending")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    backup(domain.name, config)
    journal_dir = image_dir / "kb" / "state" / "journal"
    entry = journal.Entry(domain=domain.name, uuid=domain.dom.UUIDString(), stage="snapshot", disks=[
        journal.JournalDisk("vda", str(domain.disks["vda"]), "file", "raw", str(domain.disks["vda"]) + ".ov")])
    journal.write_entry(journal_dir, entry)
    before = {p: p.stat().st_mtime_ns for p in domain.dir.iterdir()}

    proc = restore(domain.name, "--overwrite", "--define", config=config)
    one_line_error(proc, "unfinished", f"kvm-borg recover {domain.name}")
    assert {p: p.stat().st_mtime_ns for p in domain.dir.iterdir()} == before
    journal.remove_entry(journal_dir, entry.uuid)
    proc = restore(domain.name, "--overwrite", "--define", config=config)
    assert proc.returncode == 0, proc.stderr


def test_to_a_block_device_writes_into_it_only_with_overwrite(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 8), DiskSpec("vdb", "raw", 4)], running=False,
                                 name="to device")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    backup(domain.name, config)
    backing = tmp_path / "device.img"
    small = tmp_path / "small.img"
    for path, size in ((backing, 8 * MiB), (small, 4 * MiB)):
        with open(path, "wb") as handle:
            handle.truncate(size)
    with contextlib.ExitStack() as stack:
        device = stack.enter_context(loop_device(backing))
        small_device = stack.enter_context(loop_device(small))
        proc = restore(domain.name, "--disk", "vda", "--to", device, config=config)
        one_line_error(proc, "block device", "--overwrite")
        assert image_info(backing, "raw")["actual-size"] == 0  # nothing written
        proc = restore(domain.name, "--disk", "vda", "--to", small_device, "--overwrite", config=config)
        one_line_error(proc, "less than")
        proc = restore(domain.name, "--disk", "vda", "--to", device, "--overwrite", "--json", config=config)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["disks"] == {"vda": str(device)}
        assert stat.S_ISBLK(os.stat(device).st_mode)  # the node is still the device, not a file
        subprocess.run(["blockdev", "--flushbufs", str(device)], check=True)
    assert domain.verify_fill("vda", backing, "raw")
    # An existing regular file stays refused without --overwrite.
    existing = tmp_path / "existing.img"
    existing.write_bytes(b"keep")
    proc = restore(domain.name, "--disk", "vdb", "--to", existing, config=config)
    one_line_error(proc, "exists", "--overwrite")
    assert existing.read_bytes() == b"keep"


def test_a_backing_chain_restores_with_the_recorded_formats(domain_factory, image_dir, tmp_path, libvirt_conn):
    images = make_dir(image_dir / "chain")
    base = create_image(images / "base.raw", "raw", 8, "pattern", 11)
    top = images / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 1M", str(top)], check=True, capture_output=True)
    for path in (base, top):
        os.chmod(path, 0o644)
    name = domain_factory.domain_name("chain")
    libvirt_conn.defineXML(domain_xml(name, {"vda": (top, "qcow2")}, vtype=virt_type(libvirt_conn)))
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    archive = backup(name, config)
    from support import archived_meta, extract_archive
    meta = archived_meta(extract_archive(tmp_path / "repo", archive, tmp_path / "x"))
    assert meta["disks"][0]["backing_chain"] == [
        {"path": str(base), "archive_path": str(base).lstrip("/"), "format": "raw"}]

    target = image_dir / "restored"
    proc = restore(name, "--target-dir", target, "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    restored = json.loads(proc.stdout)["disks"]["vda"]
    stem = safe_file_name(name)
    assert restored == str(target / f"{stem}-vda.qcow2")
    info = image_info(restored, "qcow2")
    assert info["backing-filename"] == str(target / f"{stem}-vda-backing1.raw")
    assert info["backing-filename-format"] == "raw"
    assert qemu_img_compare(restored, top, "qcow2", "qcow2")
