"""restore_plan: where restored files go, what an archive may not name, how the XML is rewritten."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest

from kvm_borg import restore_plan
from kvm_borg.engine import host_state
from kvm_borg.sparse import SparseWriter
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


LOCAL = {"vda": restore_plan.LocalDisk("/srv/vm/web-a.qcow2"), "vdb": restore_plan.LocalDisk("/srv/vm/web-b.img")}


def test_destinations_come_from_the_local_definition_never_from_meta():
    m = meta()
    plan = restore_plan.plan_restore(m, paths_of(m), local_disks=LOCAL)
    assert plan.in_place
    assert [d.image.destination for d in plan.disks] == ["/srv/vm/web-a.qcow2", "/srv/vm/web-b.img"]
    assert plan.nvram.destination == "/var/lib/libvirt/qemu/nvram/web_VARS.fd"
    assert plan.xml_path == "/srv/vm/web.xml"
    assert plan.domain == "web" and plan.uuid == m["domain"]["uuid"]
    # Owner and mode are never taken from the archive's record (libvirt-qemu, 0644 above).
    assert all(d.image.owner is None and d.image.mode == 0o600 for d in plan.disks)


def test_a_domain_not_defined_here_goes_to_libvirts_image_directory():
    m = meta()
    plan = restore_plan.plan_restore(m, paths_of(m))
    assert not plan.in_place
    assert [d.image.destination for d in plan.disks] == ["/var/lib/libvirt/images/web-vda.qcow2",
                                                         "/var/lib/libvirt/images/web-vdb.raw"]
    assert plan.xml_path == "/var/lib/libvirt/images/web.xml"


def test_new_name_gets_new_uuid_and_file_names_beside_the_local_original():
    m = meta()
    new = "0b6f8f44-5c5e-4b38-9a3e-2f36d7f1c001"
    plan = restore_plan.plan_restore(m, paths_of(m), new_name="web copy 1", new_uuid=new, local_disks=LOCAL)
    assert plan.domain == "web copy 1" and plan.uuid == new and not plan.in_place
    assert [d.image.destination for d in plan.disks] == ["/srv/vm/web_copy_1-vda.qcow2", "/srv/vm/web_copy_1-vdb.raw"]
    assert plan.nvram.destination == "/var/lib/libvirt/qemu/nvram/web_copy_1_VARS.fd"


def test_target_dir_takes_the_images_and_the_xml_and_nvram_stays_in_libvirts_directory():
    m = meta()
    plan = restore_plan.plan_restore(m, paths_of(m), target_dir="/restore/here/", local_disks=LOCAL)
    assert {p.rsplit("/", 1)[0] for p in plan.destinations()} == {"/restore/here", "/var/lib/libvirt/qemu/nvram"}
    assert plan.nvram.destination == "/var/lib/libvirt/qemu/nvram/web_VARS.fd"


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
    new = "0b6f8f44-5c5e-4b38-9a3e-2f36d7f1c002"
    plan = restore_plan.plan_restore(m, paths_of(m) | {f"{STAGING}/tpm/tpm2/tpm2-00.permall"}, new_name="c",
                                     new_uuid=new)
    assert [f.destination for f in plan.tpm_files] == [f"/var/lib/libvirt/swtpm/{new}/tpm2/tpm2-00.permall"]


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
    local = {"vda": restore_plan.LocalDisk("/srv/vm/x.img"), "vdb": restore_plan.LocalDisk("/srv/vm/x.img")}
    with pytest.raises(UsageError, match="both be written"):
        restore_plan.plan_restore(m, paths_of(m), local_disks=local)


def test_an_in_place_block_device_needs_target_dir_and_an_archived_one_restores_as_a_file():
    m = meta()
    local = {**LOCAL, "vdb": restore_plan.LocalDisk("/dev/vg0/web-b", block=True)}
    with pytest.raises(UsageError, match="--target-dir"):
        restore_plan.plan_restore(m, paths_of(m), local_disks=local)
    m["disks"][1]["block_device"] = True
    m["disks"][1]["original_source"] = "/dev/vg0/web-b"
    plan = restore_plan.plan_restore(m, paths_of(m), target_dir="/r")
    assert plan.disks[1].image.destination == "/r/web-vdb.raw"


def test_an_archived_disk_the_local_definition_lacks_is_refused_in_place():
    m = meta()
    with pytest.raises(UsageError, match="not a file disk of the local domain"):
        restore_plan.plan_restore(m, paths_of(m), local_disks={"vda": LOCAL["vda"]})


@pytest.mark.parametrize("bad", ["../../../../etc/cron.d", "11111111-2222-3333-4444-55555555555", "",
                                 "{11111111-2222-3333-4444-555555555555}", "11111111222233334444555555555555", None, 7])
def test_a_uuid_must_be_a_uuid(bad):
    m = meta()
    m["domain"]["uuid"] = bad
    with pytest.raises(UsageError, match="UUID"):
        restore_plan.plan_restore(m, paths_of(m))


@pytest.mark.parametrize("bad", ["raw/../../x", "qcow2 -o", "host_device", "nbd", "", "QCOW2", None, 1])
def test_a_format_must_be_one_qemu_img_knows(bad):
    m = meta()
    m["disks"][0]["format"] = bad
    with pytest.raises(UsageError, match="format"):
        restore_plan.plan_restore(m, paths_of(m))


def test_backing_layers_need_a_recorded_format_and_are_named_locally():
    m = meta()
    m["disks"][0]["backing_chain"] = [{"path": "/etc/cron.d/evil", "archive_path": "images/base.raw"}]
    paths = paths_of(m) | {"images/base.raw"}
    with pytest.raises(UsageError, match="records no format"):
        restore_plan.plan_restore(m, paths)
    m["disks"][0]["backing_chain"][0]["format"] = "raw"
    plan = restore_plan.plan_restore(m, paths, target_dir="/r")
    assert plan.disks[0].backing == ((restore_plan.RestoreFile("images/base.raw", "/r/web-vda-backing1.raw"), "raw"),)
    m["disks"][0]["backing_chain"][0]["format"] = "raw -o x"
    with pytest.raises(UsageError, match="format"):
        restore_plan.plan_restore(m, paths)


@pytest.mark.parametrize("name", ["", "   ", "a/b", "x\ny", "tab\there", "\x7f", ".", "..", "n" * 201])
def test_a_domain_name_libvirt_would_refuse_is_refused(name):
    m = meta()
    with pytest.raises(UsageError, match="--name"):
        restore_plan.plan_restore(m, paths_of(m), new_name=name)
    m["domain"]["name"] = name
    with pytest.raises(UsageError, match="domain name"):
        restore_plan.plan_restore(m, paths_of(m))


@pytest.mark.parametrize("kind", ["symlink", "device", "fifo", "dir", "hardlink", "unknown"])
def test_only_regular_files_are_read_from_an_archive(kind):
    m = meta()
    types = {p: "file" for p in paths_of(m)}
    types["images/web.qcow2"] = kind
    with pytest.raises(UsageError, match="not a regular file"):
        restore_plan.plan_restore(m, paths_of(m), archive_types=types)
    types["images/web.qcow2"] = "file"
    restore_plan.plan_restore(m, paths_of(m), archive_types=types)


def _set(m, path, value):
    node = m
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@pytest.mark.parametrize("path,value", [
    (("kvm_borg",), 2), (("kvm_borg",), True), (("domain",), "web"), (("domain", "name"), 5),
    (("disks",), {"vda": 1}), (("disks", 0), "vda"), (("disks", 0, "virtual_size"), 1 << 80),
    (("disks", 0, "virtual_size"), -1), (("disks", 0, "virtual_size"), "1G"), (("disks", 0, "virtual_size"), True),
    (("disks", 0, "backing_chain"), "x"), (("disks", 0, "backing_chain"), [5]), (("disks", 0, "block_device"), "yes"),
    (("files",), []), (("files", "domain_xml"), None), (("files", "tpm_state"), {"a": 1}), (("firmware",), "efi"),
    (("firmware", "nvram"), ["x"]), (("firmware", "nvram"), "relative/nvram"), (("skipped_disks",), [3]),
    (("tpm",), "yes"), (("host",), 3),
])
def test_malformed_meta_is_one_clear_error(path, value):
    m = meta()
    paths = paths_of(m)
    _set(m, path, value)
    with pytest.raises(UsageError, match="archive"):
        restore_plan.plan_restore(m, paths)


def test_missing_keys_are_one_clear_error():
    for key in ("domain", "disks", "files"):
        m = meta()
        del m[key]
        with pytest.raises(UsageError):
            restore_plan.plan_restore(m, paths_of(meta()))
    m = meta()
    del m["disks"][0]["archive_path"]
    with pytest.raises(UsageError):
        restore_plan.plan_restore(m, paths_of(meta()))


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


def test_meta_records_the_format_of_every_backing_layer():
    from kvm_borg import metadata
    from kvm_borg.models import FrozenDisk

    disk = FrozenDisk("vda", "/i/top.qcow2", "qcow2", 1, "/i/top.qcow2", ("/i/mid.qcow2", "/i/base.raw"),
                      backing_formats=("qcow2", "raw"))
    assert metadata.backing_layers(disk) == [
        {"path": "/i/mid.qcow2", "archive_path": "i/mid.qcow2", "format": "qcow2"},
        {"path": "/i/base.raw", "archive_path": "i/base.raw", "format": "raw"}]


def test_restored_files_get_local_owner_and_mode_and_temp_files_never_follow(tmp_path):
    import os

    from kvm_borg.atomic import replace_streamed, write_all
    from kvm_borg.errors import RefusedError
    from kvm_borg.restore_files import local_owner
    from kvm_borg.restore_refusals import refuse_symlinks_below

    assert local_owner(str(tmp_path / "new")) == (0, 0, 0o600)
    existing = tmp_path / "existing"
    existing.write_bytes(b"x")
    os.chmod(existing, 0o6777)
    assert local_owner(str(existing))[2] == 0o664  # no setuid/setgid, execute or world-write bit
    seen = {}

    def fill(fd):  # while the bytes go in, the temp file is 0600 and not the target
        seen["mode"] = os.fstat(fd).st_mode & 0o7777
        seen["is_target"] = os.path.samestat(os.fstat(fd), os.stat(existing))
        write_all(fd, b"new")
        return 3

    assert replace_streamed(existing, fill, 0o640) == 3
    assert seen == {"mode": 0o600, "is_target": False}
    assert existing.read_bytes() == b"new" and os.stat(existing).st_mode & 0o7777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no temp file left
    (tmp_path / "root").mkdir()
    os.symlink("/etc", tmp_path / "root" / "uuid")
    with pytest.raises(RefusedError, match="symlink"):
        refuse_symlinks_below(str(tmp_path / "root"), str(tmp_path / "root" / "uuid" / "cron.d" / "x"))
    refuse_symlinks_below(str(tmp_path / "root"), str(tmp_path / "root" / "other" / "x"))


# --- the segments layout (bitmap method) ---------------------------------------------------------

VIEW = "var/lib/kvm-borg/view/1111/vda"


def segmented_meta(**disk_changes) -> dict:
    m = meta()
    m["disks"][0].update({"archive_path": VIEW, "layout": "segments", "segments": {"size": 4 << 20, "count": 256},
                          "virtual_size": 1 << 30})
    m["disks"][0].update(disk_changes)
    return m


def test_a_segmented_disk_is_planned_from_its_directory_flat_in_its_original_format():
    m = segmented_meta()
    types = {p: "file" for p in paths_of(m)} | {VIEW: "dir"}
    plan = restore_plan.plan_restore(m, paths_of(m), target_dir="/restore", archive_types=types)
    vda, vdb = plan.disks
    assert vda.segmented and (vda.segment_size, vda.segment_count) == (4 << 20, 256) and vda.backing == ()
    assert vda.image.archive_path == VIEW and vda.image.destination == "/restore/web-vda.qcow2"
    assert not vdb.segmented and vdb.layout == "image"


def test_a_segmented_disk_stored_as_a_file_or_an_image_stored_as_a_directory_is_refused():
    m = segmented_meta()
    with pytest.raises(UsageError, match="as a file, not a directory"):
        restore_plan.plan_restore(m, paths_of(m), target_dir="/r", archive_types={p: "file" for p in paths_of(m)})
    plain = meta()
    types = {p: "file" for p in paths_of(plain)} | {"images/web.qcow2": "dir"}
    with pytest.raises(UsageError, match="as a dir, not a regular file"):
        restore_plan.plan_restore(plain, paths_of(plain), target_dir="/r", archive_types=types)


@pytest.mark.parametrize("changes, message", [
    ({"layout": "chunks"}, "disks\\[0\\].layout: expected one of image, segments"),
    ({"layout": 1}, "layout: expected one of"),
    ({"segments": None}, "disks\\[0\\].segments: expected an object"),
    ({"segments": {"size": 1000, "count": 256}}, "segments.size: expected a multiple of 64 KiB"),
    ({"segments": {"size": 2 << 30, "count": 1}}, "segments.size"),
    ({"segments": {"size": True, "count": 256}}, "segments.size"),
    ({"segments": {"size": 4 << 20, "count": 255}}, "segments.count: expected 256 segments"),
    ({"segments": {"size": 4 << 20, "count": "256"}}, "segments.count"),
    ({"backing_chain": [{"path": "/b.qcow2", "archive_path": "b.qcow2", "format": "qcow2"}]}, "no backing files"),
    ({"format": "vmdk"}, "restored as qcow2 or raw, not 'vmdk'"),
])
def test_a_bad_segments_entry_is_one_line_naming_the_key(changes, message):
    m = segmented_meta(**changes)
    with pytest.raises(UsageError, match=message):
        restore_plan.plan_restore(m, paths_of(m), target_dir="/r")


def test_segments_on_an_image_disk_are_refused():
    m = meta()
    m["disks"][1]["segments"] = {"size": 65536, "count": 16}
    with pytest.raises(UsageError, match="disks\\[1\\].segments: given for a disk whose layout is not segments"):
        restore_plan.plan_restore(m, paths_of(m), target_dir="/r")


def test_an_explicit_image_layout_is_an_image():
    m = meta()
    m["disks"][1]["layout"] = "image"
    assert not restore_plan.plan_restore(m, paths_of(m), target_dir="/r").disks[1].segmented
