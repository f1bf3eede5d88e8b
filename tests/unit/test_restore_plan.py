"""restore_plan: where restored files go, what an archive may not name, how the XML is rewritten."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest

from kvm_borg import host_state, restore_plan
from kvm_borg.actions.restore import SparseWriter
from kvm_borg.errors import UsageError

STAGING = "var/lib/kvm-borg/staging/1111"


def meta(**overrides) -> dict:
    data = {
        "kvm_borg": 1,
        "domain": {"name": "web", "uuid": "11111111-2222-3333-4444-555555555555"},
        "disks": [
            {"target": "vda", "format": "qcow2", "virtual_size": 1 << 30, "original_source": "/images/web.qcow2",
             "archive_path": "images/web.qcow2", "backing_chain": [],
             "owner": {"user": "libvirt-qemu", "group": "kvm", "mode": 0o644}},
            {"target": "vdb", "format": "raw", "virtual_size": 1 << 20, "original_source": "/data/web-b.img",
             "archive_path": "data/web-b.img", "backing_chain": []},
        ],
        "skipped_disks": [],
        "files": {"domain_xml": f"{STAGING}/domain.xml", "nvram": f"{STAGING}/nvram.fd"},
        "firmware": {"loader": "/usr/share/OVMF/OVMF_CODE_4M.fd", "loader_type": "pflash",
                     "nvram": "/var/lib/libvirt/qemu/nvram/web_VARS.fd"},
    }
    data.update(overrides)
    return data


def paths_of(m: dict) -> frozenset[str]:
    return frozenset([d["archive_path"] for d in m["disks"]] + [f"{STAGING}/domain.xml", f"{STAGING}/nvram.fd",
                                                               f"{STAGING}/meta.json"])


def test_default_destinations_are_the_original_paths_from_meta():
    m = meta()
    plan = restore_plan.plan_restore(m, paths_of(m))
    assert [d.image.destination for d in plan.disks] == ["/images/web.qcow2", "/data/web-b.img"]
    assert plan.nvram.destination == "/var/lib/libvirt/qemu/nvram/web_VARS.fd"
    assert plan.xml_path == "/images/web.xml"
    assert plan.domain == "web" and plan.uuid == m["domain"]["uuid"]
    assert plan.disks[0].image.owner == "libvirt-qemu" and plan.disks[0].image.mode == 0o644
    assert plan.disks[1].image.owner is None and plan.disks[1].image.mode == 0o600


def test_new_name_gets_new_uuid_and_file_names_beside_the_original():
    m = meta()
    plan = restore_plan.plan_restore(m, paths_of(m), new_name="web copy/1", new_uuid="u-new")
    assert plan.domain == "web copy/1" and plan.uuid == "u-new"
    assert [d.image.destination for d in plan.disks] == ["/images/web_copy_1-vda.qcow2", "/data/web_copy_1-vdb.raw"]
    assert plan.nvram.destination == "/var/lib/libvirt/qemu/nvram/web_copy_1_VARS.fd"


def test_target_dir_takes_every_file():
    m = meta()
    plan = restore_plan.plan_restore(m, paths_of(m), target_dir="/restore/here/")
    assert {p.rsplit("/", 1)[0] for p in plan.destinations()} == {"/restore/here"}


def test_disk_subset_restores_no_nvram_and_no_xml():
    m = meta()
    plan = restore_plan.plan_restore(m, paths_of(m), disks=["vdb"])
    assert [d.target for d in plan.disks] == ["vdb"] and plan.nvram is None and plan.xml_path is None
    with pytest.raises(UsageError, match="no disk vdz"):
        restore_plan.plan_restore(m, paths_of(m), disks=["vdz"])


@pytest.mark.parametrize("bad", ["/etc/shadow", "../../etc/shadow", "images/../../x", "", "a/\0b"])
def test_archive_paths_that_escape_are_refused(bad):
    m = meta()
    m["disks"][0]["archive_path"] = bad
    with pytest.raises(UsageError):
        restore_plan.plan_restore(m, paths_of(m) | {bad})


@pytest.mark.parametrize("bad", ["relative/x.img", "/images/../etc/passwd", "/images//x.img", "/images/"])
def test_original_paths_must_be_absolute_and_plain(bad):
    m = meta()
    m["disks"][0]["original_source"] = bad
    with pytest.raises(UsageError):
        restore_plan.plan_restore(m, paths_of(m))


@pytest.mark.parametrize("bad", ["../vda", "vda/x", "VDA;rm", "", None])
def test_disk_targets_must_be_device_names(bad):
    m = meta()
    m["disks"][0]["target"] = bad
    with pytest.raises(UsageError):
        restore_plan.plan_restore(m, paths_of(m))


def test_tpm_relative_paths_are_checked():
    m = meta(tpm={"model": "tpm-crb"})
    m["files"]["tpm_state"] = [{"relative": "../../../root/.ssh/authorized_keys", "archive_path": f"{STAGING}/tpm/x"}]
    with pytest.raises(UsageError, match="outside"):
        restore_plan.plan_restore(m, paths_of(m) | {f"{STAGING}/tpm/x"})


def test_tpm_state_goes_to_the_restored_uuid():
    m = meta(tpm={"model": "tpm-crb"})
    m["files"]["tpm_state"] = [{"relative": "tpm2/tpm2-00.permall", "archive_path": f"{STAGING}/tpm/tpm2/tpm2-00.permall"}]
    plan = restore_plan.plan_restore(m, paths_of(m) | {f"{STAGING}/tpm/tpm2/tpm2-00.permall"}, new_name="c",
                                     new_uuid="abc")
    assert [f.destination for f in plan.tpm_files] == ["/var/lib/libvirt/swtpm/abc/tpm2/tpm2-00.permall"]


def test_nvram_named_in_meta_but_absent_from_the_archive_is_refused():
    m = meta()
    with pytest.raises(UsageError, match="lacks NVRAM file"):
        restore_plan.plan_restore(m, paths_of(m) - {f"{STAGING}/nvram.fd"})


def test_nvram_missing_at_backup_time_is_a_warning():
    m = meta()
    del m["files"]["nvram"]
    m["firmware"]["nvram_missing"] = "cannot read it"
    plan = restore_plan.plan_restore(m, paths_of(m))
    assert plan.nvram is None and "cannot read it" in plan.warnings[0]


def test_two_files_onto_one_destination_are_refused():
    m = meta()
    m["disks"][1]["original_source"] = "/images/web.qcow2"
    with pytest.raises(UsageError, match="both be written"):
        restore_plan.plan_restore(m, paths_of(m))


def test_block_device_needs_target_dir():
    m = meta()
    m["disks"][1]["block_device"] = True
    m["disks"][1]["original_source"] = "/dev/vg0/web-b"
    with pytest.raises(UsageError, match="--target-dir"):
        restore_plan.plan_restore(m, paths_of(m))
    plan = restore_plan.plan_restore(m, paths_of(m), target_dir="/r")
    assert plan.disks[1].image.destination == "/r/web-vdb.raw"


ARCHIVED_XML = """<domain type='kvm'>
  <name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
  <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
      <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/images/web.qcow2.kvm-borg-20260101T000000Z.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/images/web.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/b'/>
      <target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/images/scratch.img'/>
      <target dev='vdc' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
    <serial type='file'><source path='/var/log/web-console.log'/><target port='0'/></serial>
    <graphics type='vnc' port='5901' autoport='no'/>
  </devices>
</domain>"""


def test_xml_rewrite_points_disks_and_nvram_at_the_restored_files():
    xml = restore_plan.rewrite_domain_xml(
        ARCHIVED_XML, disks={"vda": ("/r/vda.qcow2", "qcow2"), "vdb": ("/r/vdb.raw", "raw")},
        nvram="/r/web_VARS.fd")
    root = ET.fromstring(xml)
    disks = {d.find("target").get("dev"): d for d in root.findall("./devices/disk")}
    assert disks["vda"].find("source").get("file") == "/r/vda.qcow2" and disks["vda"].find("backingStore") is None
    assert disks["vdb"].get("type") == "file" and disks["vdb"].find("source").get("file") == "/r/vdb.raw"
    assert root.findtext("./os/nvram") == "/r/web_VARS.fd"
    assert root.find("./os/nvram").get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert root.findtext("name") == "web" and root.find("./devices/interface/mac").get("address") == "52:54:00:aa:bb:cc"


def test_xml_rewrite_for_a_copy_renames_and_changes_uuid_and_macs():
    xml = restore_plan.rewrite_domain_xml(ARCHIVED_XML, disks={}, name="web2", uuid="u2", new_macs=True,
                                          drop_disks=["vdc"], rng=random.Random(1))
    root = ET.fromstring(xml)
    assert root.findtext("name") == "web2" and root.findtext("uuid") == "u2"
    mac = root.find("./devices/interface/mac").get("address")
    assert mac.startswith("52:54:00:") and mac != "52:54:00:aa:bb:cc"
    assert [d.find("target").get("dev") for d in root.findall("./devices/disk")] == ["vda", "vdb"]
    assert root.find("./devices/graphics").get("autoport") == "yes"


def test_isolated_xml_has_no_network_and_its_own_console_file():
    xml = restore_plan.rewrite_domain_xml(ARCHIVED_XML, disks={}, isolate=True, scratch_dir="/scratch")
    root = ET.fromstring(xml)
    assert root.find("./devices/interface") is None
    assert root.find("./devices/serial/source").get("path") == "/scratch/serial-web-console.log"


def test_meta_is_found_by_listing_and_json_marker():
    paths = ["images/web.qcow2", f"{STAGING}/meta.json", "home/u/not-meta.json"]
    assert restore_plan.meta_candidates(paths) == [f"{STAGING}/meta.json"]
    assert restore_plan.parse_meta('{"kvm_borg": 1, "disks": [], "domain": {}}') is not None
    assert restore_plan.parse_meta('{"disks": [], "domain": {}}') is None
    assert restore_plan.parse_meta("not json") is None


def test_declared_nvram_detects_uefi():
    assert restore_plan.declared_nvram(ARCHIVED_XML)
    assert not restore_plan.declared_nvram("<domain><os><type>hvm</type></os></domain>")
    assert restore_plan.declared_nvram("<domain><os firmware='efi'><type>hvm</type></os></domain>")


def test_firmware_record_falls_back_to_the_live_xml():
    persistent = "<domain><os firmware='efi'><type>hvm</type></os></domain>"
    live = ("<domain><os firmware='efi'><type>hvm</type><loader type='pflash' readonly='yes'>/c.fd</loader>"
            "<nvram template='/t.fd'>/n.fd</nvram></os></domain>")
    record = host_state.firmware_record(persistent, live)
    assert record["loader"] == "/c.fd" and record["nvram"] == "/n.fd" and record["nvram_template"] == "/t.fd"
    assert host_state.firmware_record("<domain><os><type>hvm</type></os></domain>", None) is None


def test_tpm_and_networks_are_read_from_the_xml():
    xml = ("<domain><devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
           "<interface type='network'><source network='a'/></interface>"
           "<interface type='network'><source network='a'/></interface>"
           "<interface type='bridge'><source bridge='br0'/></interface></devices></domain>")
    assert host_state.tpm_emulator(xml) == {"model": "tpm-crb", "version": "2.0", "encrypted": False}
    assert host_state.interface_networks(xml) == ["a"]
    assert host_state.tpm_emulator("<domain><devices/></domain>") is None


def test_sparse_writer_leaves_holes_for_zero_blocks(tmp_path):
    path = tmp_path / "out"
    data = bytes(3 << 20) + b"\x01" * 4096 + bytes(1 << 20) + b"\x02" * 100
    with open(path, "wb") as handle:
        writer = SparseWriter(handle.fileno())
        for i in range(0, len(data), 65536 - 3):  # chunk sizes not aligned to blocks
            writer.write(data[i:i + 65536 - 3])
        assert writer.close() == len(data)
    assert path.read_bytes() == data
    assert path.stat().st_blocks * 512 <= 3 * 4096


def test_partx_output_is_parsed_and_garbage_ignored():
    from kvm_borg.actions.mount import parse_partx

    assert parse_partx(" 1  2048   40960\n 2 43008   88064\n") == [(1, 2048, 40960), (2, 43008, 88064)]
    assert parse_partx("partx: failed\n") == []


def test_blockdev_chain_never_follows_a_header_backing_path():
    import json

    from kvm_borg.actions.mount import blockdev_options

    nodes = [json.loads(a) for a in blockdev_options("/m/top.qcow2", "qcow2", "/w/ov.qcow2", [("/m/base.raw", "raw")])]
    by_name = {n["node-name"]: n for n in nodes}
    assert by_name["l0"]["backing"] == "l1" and "backing" not in by_name["l1"]  # raw has none
    assert all(by_name[f"f{i}"]["read-only"] for i in (0, 1))
    assert by_name["overlay"]["backing"] == "l0" and by_name["of"]["filename"] == "/w/ov.qcow2"
    single = {n["node-name"]: n for n in map(json.loads, blockdev_options("/m/a b,c.qcow2", "qcow2", "/w/o", []))}
    assert single["l0"]["backing"] is None and single["f0"]["filename"] == "/m/a b,c.qcow2"
    # Nodes are defined before they are referenced.
    names = [n["node-name"] for n in nodes]
    assert names.index("l1") < names.index("l0") < names.index("overlay")
