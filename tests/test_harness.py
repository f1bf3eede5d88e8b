"""Self-tests of the test harness against the real libvirtd + QEMU stack."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from harness import (
    BORG_BIN,
    DOMAIN_PREFIX,
    KVM_BORG_BIN,
    TEST_PASSPHRASE,
    TEST_ROOT,
    DiskSpec,
    DomainFactory,
    HmpError,
    MiB,
    create_image,
    disk_aliases,
    domain_xml,
    hmp_read_check,
    hmp_write,
    image_has_pattern,
    inactive_sources,
    live_sources,
    make_dir,
    mib_byte,
    new_run_id,
    qemu_img_compare,
    backing_chain,
    borg_env,
    run_borg,
    run_cli,
    sweep_stale,
    verify_fill,
    virt_type,
)


def _domain_names(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains(0)}


def _external_snapshot(td, overlay_dir: Path, metadata: bool = False) -> dict[str, str]:
    """Disk-only external snapshot of every disk into qcow2 overlays in overlay_dir."""
    overlays = {t: str(overlay_dir / f"{Path(p).name}.overlay.qcow2") for t, p in td.disks.items()}
    disks = "".join(
        f"<disk name='{t}' snapshot='external'><driver type='qcow2'/><source file='{o}'/></disk>"
        for t, o in overlays.items()
    )
    xml = f"<domainsnapshot><name>kbsnap</name><disks>{disks}</disks></domainsnapshot>"
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    if not metadata:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    td.dom.snapshotCreateXML(xml, flags)
    return overlays


def test_two_disk_domain_hmp_write_lands_in_active_layer(domain_factory, libvirt_conn):
    td = domain_factory.make(
        disks=[
            DiskSpec(target="vda", fmt="qcow2", size_mib=64, fill="pattern"),
            DiskSpec(target="vdb", fmt="raw", size_mib=16, fill="pattern"),
        ]
    )
    assert td.name.startswith(DOMAIN_PREFIX)
    assert td.is_active() and td.dom.isPersistent()
    assert td.formats == {"vda": "qcow2", "vdb": "raw"}
    assert live_sources(td.dom) == {t: str(p) for t, p in td.disks.items()}
    assert inactive_sources(td.dom) == live_sources(td.dom)
    assert set(disk_aliases(td.dom)) == {"vda", "vdb"}
    root = ET.fromstring(td.xml())
    assert root.get("type") == virt_type(libvirt_conn)
    assert root.find("./devices/interface") is None

    # Initial content, read while the VM runs (force-share).
    assert td.verify_fill("vda") and td.verify_fill("vdb")
    va, vb = td.specs["vda"].effective_seed(), td.specs["vdb"].effective_seed()
    assert image_has_pattern(td.disks["vda"], "qcow2", mib_byte(va, 1), 1 * MiB, MiB)
    assert not image_has_pattern(td.disks["vda"], "qcow2", mib_byte(vb, 1), 1 * MiB, MiB) or va == vb

    # Guest writes through the running VM.
    hmp_write(td.dom, "vda", 0xAB, 1 * MiB, 64 * 1024)
    td.hmp_write("vdb", 0xCD, 3 * MiB + 4096, 8192)
    assert hmp_read_check(td.dom, "vda", 0xAB, 1 * MiB, 64 * 1024)
    assert not hmp_read_check(td.dom, "vda", 0xAC, 1 * MiB, 64 * 1024)
    # Visible to host readers while running (hmp_write flushes) ...
    assert image_has_pattern(td.disks["vda"], "qcow2", 0xAB, 1 * MiB, 64 * 1024)
    assert td.has_pattern("vdb", 0xCD, 3 * MiB + 4096, 8192)

    # ... and after a hard power-off, read without force-share contention.
    td.destroy()
    assert not td.is_active()
    assert image_has_pattern(td.disks["vda"], "qcow2", 0xAB, 1 * MiB, 64 * 1024)
    assert image_has_pattern(td.disks["vda"], "qcow2", mib_byte(va, 1), 1 * MiB + 64 * 1024, MiB - 64 * 1024)
    assert image_has_pattern(td.disks["vda"], "qcow2", mib_byte(va, 2), 2 * MiB, MiB)
    assert image_has_pattern(td.disks["vdb"], "raw", 0xCD, 3 * MiB + 4096, 8192)
    raw = td.disks["vdb"].read_bytes()
    assert raw[3 * MiB + 4096 : 3 * MiB + 4096 + 8192] == bytes([0xCD]) * 8192
    assert raw[3 * MiB : 3 * MiB + 4096] == bytes([mib_byte(vb, 3)]) * 4096
    assert not td.verify_fill("vda") and not td.verify_fill("vdb")


def test_hmp_write_errors(domain_factory):
    td = domain_factory.make(disks=[DiskSpec(size_mib=8)])
    with pytest.raises(HmpError):
        hmp_write(td.dom, "vdz", 0x11, 0, 512)


def test_hmp_write_goes_to_overlay_after_external_snapshot(domain_factory, image_dir):
    td = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16), DiskSpec("vdb", "raw", 8)])
    overlays = _external_snapshot(td, td.dir)
    assert live_sources(td.dom) == overlays
    for t in ("vda", "vdb"):
        td.hmp_write(t, 0x5A, 0, 64 * 1024)
        # New data in the overlay (guest view through the chain) ...
        assert image_has_pattern(overlays[t], "qcow2", 0x5A, 0, 64 * 1024)
        assert backing_chain(overlays[t], "qcow2")[1] == str(td.disks[t])
        # ... old data still visible through it, base image untouched.
        seed = td.specs[t].effective_seed()
        assert image_has_pattern(overlays[t], "qcow2", mib_byte(seed, 1), MiB, MiB)
        assert not image_has_pattern(td.disks[t], td.formats[t], 0x5A, 0, 64 * 1024)
        assert td.verify_fill(t)
        assert not qemu_img_compare(overlays[t], td.disks[t], "qcow2", td.formats[t])


def test_qemu_img_compare(image_dir):
    a = create_image(image_dir / "a.qcow2", "qcow2", 8, "pattern", seed=3)
    b = image_dir / "b.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(a), str(b)], check=True)
    assert qemu_img_compare(a, b, "qcow2", "raw")
    assert qemu_img_compare(a, b)  # formats probed
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x01 4096 512", str(b)], check=True,
                   capture_output=True)
    assert not qemu_img_compare(a, b, "qcow2", "raw")


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("fill", ["pattern", "zero", None, 0x7E, "random", "sparse", [(0x42, 4096, 8192)]])
def test_fill_modes(image_dir, fmt, fill):
    p = create_image(image_dir / f"img.{fmt}", fmt, 4, fill, seed=9)
    assert verify_fill(p, fmt, 4, fill, 9)
    other = "zero" if fill not in ("zero", None) else 0x01
    assert not verify_fill(p, fmt, 4, other, 9)
    if fill == "pattern":
        assert image_has_pattern(p, fmt, mib_byte(9, 3), 3 * MiB, MiB)
    if fill == "sparse":
        assert image_has_pattern(p, fmt, 0, 1 * MiB, MiB)
    if fill == "random":
        assert not verify_fill(p, fmt, 4, "random", 10)


def test_unusual_names_and_transient(domain_factory):
    td = domain_factory.make(
        disks=[DiskSpec("vda", "raw", 4, filename="disk with space ü.img")],
        name="vm with space ü",
    )
    assert td.name.endswith("vm with space ü")
    assert td.dom.name() == td.name
    assert live_sources(td.dom)["vda"].endswith("disk with space ü.img")
    td.hmp_write("vda", 0x33, 0, 4096)
    assert td.has_pattern("vda", 0x33, 0, 4096)

    tr = domain_factory.make(disks=[DiskSpec(size_mib=4)], persistent=False)
    assert tr.is_active() and not tr.dom.isPersistent()
    off = domain_factory.make(disks=[DiskSpec(size_mib=4)], running=False)
    assert not off.is_active() and off.dom.isPersistent()
    with pytest.raises(ValueError):
        domain_factory.make(running=False, persistent=False)


def test_teardown_leaves_no_domain_and_no_files(libvirt_conn, run_dir, run_id):
    parent = make_dir(run_dir / "teardown-selftest")
    factory = DomainFactory(libvirt_conn, parent, run_id, label="teardown")
    running = factory.make(disks=[DiskSpec("vda", "qcow2", 8), DiskSpec("vdb", "raw", 4)])
    transient = factory.make(disks=[DiskSpec(size_mib=4)], persistent=False)
    stopped = factory.make(disks=[DiskSpec(size_mib=4)], running=False)
    # Leftovers a backup tool might leave: an overlay with snapshot metadata, stray files.
    overlays = _external_snapshot(running, running.dir, metadata=True)
    assert running.dom.snapshotNum(0) == 1
    (running.dir / "vda.qcow2.kvm-borg-tmp").write_bytes(b"x")
    # A domain "restored" by the code under test, and a file it wrote elsewhere.
    restored_name = factory.domain_name("restored ü")
    restored_img = factory.track_path(parent / "restored-vda.qcow2")
    create_image(restored_img, "qcow2", 4, "zero")
    libvirt_conn.defineXML(domain_xml(restored_name, {"vda": (restored_img, "qcow2")}, vtype=virt_type()))
    names = {running.name, transient.name, stopped.name, restored_name}
    dirs = [running.dir, transient.dir, stopped.dir]
    assert names <= _domain_names(libvirt_conn)

    assert factory.cleanup() == []
    assert not names & _domain_names(libvirt_conn)
    for d in dirs:
        assert not d.exists()
    for o in overlays.values():
        assert not os.path.exists(o)
    assert not (Path("/var/lib/libvirt/qemu/snapshot") / running.name).exists()
    assert list(parent.iterdir()) == []


def test_efi_domain_nvram_removed(libvirt_conn, run_dir, run_id):
    parent = make_dir(run_dir / "efi-selftest")
    factory = DomainFactory(libvirt_conn, parent, run_id, label="efi")
    try:
        td = factory.make(disks=[DiskSpec(size_mib=4)], firmware="efi")
        nvram = ET.fromstring(td.xml()).find("./os/nvram")
        assert nvram is not None and nvram.text and os.path.exists(nvram.text)
    finally:
        assert factory.cleanup() == []
    assert not os.path.exists(nvram.text)
    assert td.name not in _domain_names(libvirt_conn)


def test_sweep_removes_only_stale_runs(libvirt_conn, run_dir, run_id):
    stale_id = new_run_id()
    stale_dir = make_dir(TEST_ROOT / stale_id)
    # An owner that is certainly gone: a finished child process.
    child = subprocess.Popen(["true"])
    child.wait()
    (stale_dir / "owner").write_text(f"{child.pid} 0\n")
    stale = DomainFactory(libvirt_conn, stale_dir, stale_id, label="stale").make(disks=[DiskSpec(size_mib=4)])
    mine = DomainFactory(libvirt_conn, make_dir(run_dir / "sweep-selftest"), run_id, label="live")
    live = mine.make(disks=[DiskSpec(size_mib=4)], running=False)
    try:
        removed = sweep_stale(libvirt_conn, log=lambda m: None, only_run_ids={stale_id, run_id})
        assert removed == [stale.name]
        assert stale.name not in _domain_names(libvirt_conn)
        assert not stale_dir.exists()
        assert live.name in _domain_names(libvirt_conn)
    finally:
        assert mine.cleanup() == []


def test_borg_env_and_repo(borg_repo, tmp_path):
    assert BORG_BIN.exists()
    assert borg_repo.env["BORG_PASSPHRASE"] == TEST_PASSPHRASE
    assert borg_repo.env["BORG_BIN"] == str(BORG_BIN)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_bytes(b"hello")
    run_borg("create", f"{borg_repo.path}::a1", str(tmp_path / "data"), env=borg_repo.env)
    out = run_borg("list", "--short", str(borg_repo.path), env=borg_repo.env).stdout.split()
    assert out == ["a1"]
    wrong = dict(borg_repo.env, BORG_PASSPHRASE="wrong")
    assert run_borg("list", str(borg_repo.path), env=wrong, check=False).returncode != 0
    assert borg_env()["PATH"].startswith(str(BORG_BIN.parent))


def test_run_cli_builds_command(tmp_path):
    assert KVM_BORG_BIN.exists(), "setup.sh installs the kvm-borg console script into the venv"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    proc = run_cli("--help", config=cfg, env={"KBTEST_X": "1"}, timeout=60)
    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.args[:3] == [str(KVM_BORG_BIN), "--config", str(cfg)]
    assert proc.args[3:] == ["--help"]
