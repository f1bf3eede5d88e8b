"""`kvm-borg restore` against real libvirtd + QEMU + borg: the README's restore promises, one test each."""

from __future__ import annotations

import json
import os
import stat
import time
import xml.etree.ElementTree as ET

import libvirt

from harness import DiskSpec, qemu_img_compare, run_cli, wait_state
from kvm_borg.restore_plan import safe_file_name
from support import archived_meta, cli_env, extract_archive, write_config

MiB = 1 << 20
TWO_DISKS = [DiskSpec("vda", "qcow2", 64), DiskSpec("vdb", "raw", 64)]


def backup(domain, config) -> str:
    """Back up `domain`; return the archive name."""
    proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]


def restore(*args, config):
    return run_cli("restore", *args, config=config, env=cli_env())


def macs(xml: str) -> list[str]:
    return [m.get("address") for m in ET.fromstring(xml).findall("./devices/interface/mac")]


def test_running_two_disk_domain_restores_beside_the_original_and_starts(domain_factory, image_dir, tmp_path,
                                                                          libvirt_conn):
    domain = domain_factory.make(disks=TWO_DISKS, name="restore beside")
    domain.hmp_write("vda", 0xC1, 3 * MiB, MiB)
    domain.hmp_write("vdb", 0xC2, 5 * MiB, MiB)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    archive = backup(domain, config)
    copy = domain_factory.domain_name("restore beside copy")

    proc = restore(domain.name, "--name", copy, "--start", "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["domain"] == copy and result["archive"] == archive and result["defined"] and result["started"]
    assert set(result["disks"]) == {"vda", "vdb"}

    extracted = extract_archive(tmp_path / "repo", archive, tmp_path / "x")
    meta = archived_meta(extracted)
    for disk in meta["disks"]:
        restored = result["disks"][disk["target"]]
        assert restored != str(domain.disks[disk["target"]])  # beside, not over, the original
        assert os.path.dirname(restored) == str(domain.dir)
        assert qemu_img_compare(restored, extracted / disk["archive_path"], disk["format"], disk["format"])
    # The copy runs on the restored images, with its own name, UUID and MACs.
    dom = libvirt_conn.lookupByName(copy)
    wait_state(dom, libvirt.VIR_DOMAIN_RUNNING)
    live = ET.fromstring(dom.XMLDesc(0))
    sources = {d.find("target").get("dev"): d.find("source").get("file") for d in live.findall("./devices/disk")}
    assert sources == result["disks"]
    assert dom.UUIDString() != domain.dom.UUIDString()
    assert domain.is_active()
    assert ET.fromstring(open(result["xml"]).read()).findtext("name") == copy


def test_refusals_change_nothing(domain_factory, image_dir, tmp_path, libvirt_conn):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16)], name="refusals")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    backup(domain, config)
    before = {p: p.stat().st_mtime_ns for p in domain.dir.iterdir()}

    # Over the running original's image: refused even with --overwrite.
    for extra in ((), ("--overwrite",)):
        proc = restore(domain.name, *extra, config=config)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith("kvm-borg: error: ")
        assert "running domain" in proc.stderr or "exists" in proc.stderr
    # An existing name.
    proc = restore(domain.name, "--target-dir", image_dir / "elsewhere", "--define", config=config)
    assert proc.returncode == 2 and f"domain {domain.name!r} exists" in proc.stderr
    assert not (image_dir / "elsewhere").exists()
    # An existing image (the domain shut off): refused without --overwrite.
    domain.destroy()
    proc = restore(domain.name, config=config)
    assert proc.returncode == 2 and "give --overwrite" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in domain.dir.iterdir()} == before
    # --overwrite on a shut-off domain: done.
    proc = restore(domain.name, "--overwrite", "--define", "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["disks"] == {"vda": str(domain.disks["vda"])}
    assert domain.verify_fill("vda")


def test_one_disk_to_a_file_and_to_stdout(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=TWO_DISKS, running=False, name="one disk")
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    backup(domain, config)
    target = tmp_path / "vdb.img"
    proc = restore(domain.name, "--disk", "vdb", "--to", target, "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["disks"] == {"vdb": str(target)}
    assert domain.verify_fill("vdb", target, "raw")
    cmd_env = cli_env()
    import subprocess

    from harness import KVM_BORG_BIN
    streamed = tmp_path / "vda.stream"
    with open(streamed, "wb") as out:
        proc = subprocess.run([str(KVM_BORG_BIN), "--config", str(config), "restore", domain.name, "--disk", "vda",
                               "--to", "-"], stdout=out, stderr=subprocess.PIPE, env={**os.environ, **cmd_env},
                              stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert domain.verify_fill("vda", streamed, "qcow2")
    assert stat.S_ISREG(os.stat(streamed).st_mode)


# A 1 GiB disk: 7 runs of data at offsets that are no multiple of borg's 4 MiB chunks, holes of ~120 MiB between
# them, and 4 KiB islands in the last hole (the benchmark restores a 4 GiB image sparse: bench/suite.py).
SPARSE_MIB = 1024
SPARSE_WRITES = [(0x11 + i, (i * 140 + 7) * MiB, 16 * MiB) for i in range(7)] + [
    (0x5A, 1000 * MiB + i * 1024 * 1024 + 8192, 4096) for i in range(8)]  # 4 KiB islands in holes


def test_sparse_restore_allocates_only_the_data(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", SPARSE_MIB, fill=SPARSE_WRITES)], running=False,
                                 name="sparse")
    data = sum(length for _p, _o, length in SPARSE_WRITES)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    backup(domain, config)
    target_dir = image_dir / "restored"
    proc = restore(domain.name, "--target-dir", target_dir, "--json", config=config)
    assert proc.returncode == 0, proc.stderr
    restored = json.loads(proc.stdout)["disks"]["vda"]
    st = os.stat(restored)
    assert st.st_size == SPARSE_MIB * MiB
    assert st.st_blocks * 512 <= data * 1.05, (st.st_blocks * 512, data)
    assert domain.verify_fill("vda", restored, "raw")
    # Written atomically, with no temporary file left; a new file is root's 0600 whatever the archive
    # recorded (libvirt gives QEMU's user access when the domain starts).
    assert sorted(p.name for p in target_dir.iterdir()) == sorted([os.path.basename(restored), f"{domain.name}.xml"])
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


UEFI_XML = """<domain type='{vtype}'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>
    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def test_uefi_domain_restores_with_its_nvram(domain_factory, image_dir, tmp_path, libvirt_conn):
    from harness import create_image, make_dir

    # Measured here: under the nested KVM of this host OVMF_CODE_4M pauses the guest at once
    # (KVM internal error); under TCG it boots and writes its variables, which is what we need.
    vtype = "qemu"

    name = domain_factory.domain_name("uefi")
    disk = create_image(make_dir(image_dir / "uefi") / "vda.qcow2", "qcow2", 16, "pattern", 3)
    os.chmod(disk, 0o644)
    dom = libvirt_conn.defineXML(UEFI_XML.format(vtype=vtype, name=name, disk=disk))
    dom.create()
    wait_state(dom, libvirt.VIR_DOMAIN_RUNNING)
    nvram = ET.fromstring(dom.XMLDesc(0)).findtext("./os/nvram")
    assert nvram and os.path.exists(nvram)
    template = open("/usr/share/OVMF/OVMF_VARS_4M.fd", "rb").read()
    deadline = time.monotonic() + 120
    while open(nvram, "rb").read() == template:  # until OVMF has written its variables (~5 s under TCG)
        assert time.monotonic() < deadline, "OVMF wrote no variable"
        time.sleep(0.5)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    proc = run_cli("backup", name, "--json", config=config, env=cli_env())
    assert proc.returncode in (0, 1), proc.stderr
    archive = json.loads(proc.stdout)["domains"][0]["stores"][0]["archive"]
    extracted = extract_archive(tmp_path / "repo", archive, tmp_path / "x")
    meta = archived_meta(extracted)
    assert meta["firmware"]["loader"] == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert meta["firmware"]["loader_type"] == "pflash" and meta["firmware"]["nvram"] == nvram
    archived_vars = (extracted / meta["files"]["nvram"]).read_bytes()
    assert archived_vars != template
    dom.destroy()

    copy = domain_factory.domain_name("uefi copy")
    proc = restore(name, "--name", copy, "--target-dir", image_dir / "copy", "--define", "--json", config=config)
    assert proc.returncode in (0, 1), proc.stderr
    result = json.loads(proc.stdout)
    restored_nvram = result["nvram"]
    # NVRAM goes only to libvirt's NVRAM directory, named after the copy (never to --target-dir).
    assert restored_nvram == f"/var/lib/libvirt/qemu/nvram/{safe_file_name(copy)}_VARS.fd"
    assert open(restored_nvram, "rb").read() == archived_vars  # compared at rest: OVMF writes while it runs
    copy_dom = libvirt_conn.lookupByName(copy)
    assert ET.fromstring(copy_dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).findtext("./os/nvram") == restored_nvram
    copy_dom.create()
    wait_state(copy_dom, libvirt.VIR_DOMAIN_RUNNING)
    copy_dom.destroy()


def _evil_archive(repo, workdir, meta_changes) -> str:
    """Store a hand-made kvm-borg archive whose meta.json is changed by `meta_changes(meta)`; return its name."""
    staging = workdir / "var" / "lib" / "kvm-borg" / "staging" / "evil"
    staging.mkdir(parents=True)
    (workdir / "img").mkdir()
    (workdir / "img" / "vda.raw").write_bytes(b"\1" * 4096)
    meta = {"kvm_borg": 1, "domain": {"name": "evil", "uuid": "6c5d7b43-0000-4000-8000-000000000001"},
            "disks": [{"target": "vda", "format": "raw", "virtual_size": 4096, "original_source": "/img/vda.raw",
                       "archive_path": "img/vda.raw", "backing_chain": []}],
            "skipped_disks": [], "files": {"domain_xml": "var/lib/kvm-borg/staging/evil/domain.xml"}}
    meta_changes(meta)
    (staging / "meta.json").write_text(json.dumps(meta))
    (staging / "domain.xml").write_text("<domain type='qemu'><name>evil</name><os><type>hvm</type></os>"
                                        "<devices/></domain>")
    name = f"evil-2026010{len(list(workdir.parent.iterdir()))}T000000Z"
    import subprocess

    from harness import BORG_BIN, borg_env
    subprocess.run([str(BORG_BIN), "create", f"{repo}::{name}", "var", "img"], cwd=workdir, check=True,
                   env=borg_env(), capture_output=True)
    return name


def test_paths_from_a_hostile_archive_are_refused(image_dir, tmp_path):
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo")
    target = image_dir / "target"
    cases = {
        "absolute archive path": lambda m: m["disks"][0].update(archive_path="/etc/passwd"),
        "traversal in archive path": lambda m: m["disks"][0].update(archive_path="img/../../../etc/passwd"),
        "traversal in original path": lambda m: m["disks"][0].update(original_source="/img/../etc/cron.d/x"),
        "traversal in disk target": lambda m: m["disks"][0].update(target="../vda"),
    }
    for i, (case, change) in enumerate(cases.items()):
        work = tmp_path / "evil" / str(i)
        work.mkdir(parents=True)
        archive = _evil_archive(tmp_path / "repo", work, change)
        for extra in ((), ("--target-dir", target)):
            proc = restore("evil", "--archive", archive, *extra, config=config)
            assert proc.returncode == 2, (case, proc.stderr)
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith("kvm-borg: error: archive names ") and ("refused" in last or "invalid" in last), case
    assert not target.exists() and not os.path.exists("/img")


def test_cross_node_restore_goes_to_libvirts_image_directory(domain_factory, image_dir, tmp_path, libvirt_conn):
    """Node A backs up; node B (another hostname, same repository) has neither the domain nor its files:
    the images land in /var/lib/libvirt/images (never at the archive's paths) and the domain starts."""
    domain = domain_factory.make(disks=TWO_DISKS, running=False, name="cross node")
    repo = tmp_path / "repo"
    config_a = write_config(image_dir / "node-a", repo_path=repo, hostname="node-a")
    backup(domain, config_a)
    original_xml = domain.xml(inactive=True)
    reference = {t: tmp_path / f"{t}.ref" for t in domain.disks}
    for target, path in domain.disks.items():
        os.rename(path, reference[target])
    domain.dom.undefine()
    stem = safe_file_name(domain.name)  # "kbtest-<run>-cross_node"
    expected = {t: f"/var/lib/libvirt/images/{stem}-{t}.{domain.formats[t]}" for t in domain.disks}
    for path in [*expected.values(), f"/var/lib/libvirt/images/{stem}.xml"]:
        assert not os.path.lexists(path)
        domain_factory.track_path(path)
    config_b = write_config(image_dir / "node-b", repo_path=repo, hostname="node-b", init=False)
    proc = restore(domain.name, "--start", "--json", config=config_b)  # node-b takes only its own archives
    assert proc.returncode == 2 and "give --host NAME" in proc.stderr and "node-a" in proc.stderr, proc.stderr
    assert not any(os.path.exists(p) for p in domain.disks.values())
    proc = restore(domain.name, "--host", "node-a", "--start", "--json", config=config_b)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["disks"] == expected
    for target in domain.disks:
        assert not os.path.exists(domain.disks[target])  # the archive's paths are not destinations
        assert qemu_img_compare(expected[target], reference[target], domain.formats[target], domain.formats[target])
    assert domain.is_active()
    assert domain.dom.UUIDString() == ET.fromstring(original_xml).findtext("uuid")
    live = ET.fromstring(domain.dom.XMLDesc(0))
    assert {d.find("target").get("dev"): d.find("source").get("file") for d in live.findall("./devices/disk")} == expected
