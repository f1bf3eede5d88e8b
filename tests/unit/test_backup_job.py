"""The pure builders of engine/backup_job.py: backup and checkpoint XML, checkpoint names, the DAC owner."""

import xml.etree.ElementTree as ET

import pytest

from kvm_borg.engine import backup_job


def test_checkpoint_name_is_utc_timestamp_and_8_hex():
    name = backup_job.new_checkpoint_name(0, "0123abcd")
    assert name == "kvm-borg.19700101T000000Z.0123abcd"
    assert backup_job.is_own_checkpoint(name)


def test_checkpoint_names_are_unique_and_sort_by_time():
    names = {backup_job.new_checkpoint_name(1796150593) for _ in range(50)}
    assert len(names) == 50
    assert all(backup_job.is_own_checkpoint(n) for n in names)
    assert backup_job.new_checkpoint_name(1796150593, "ffffffff") < backup_job.new_checkpoint_name(1796150594, "00000000")


def test_bad_checkpoint_suffix_is_refused():
    with pytest.raises(ValueError):
        backup_job.new_checkpoint_name(0, "xyz")


@pytest.mark.parametrize("name", ["kvm-borg.x", "kvm-borg-20261201T000000Z", "mine", "kvm-borg.20261201T000000Z.0123abcd.x",
                                  "other.kvm-borg.20261201T000000Z.0123abcd"])
def test_foreign_checkpoints_are_not_ours(name):
    assert not backup_job.is_own_checkpoint(name)


def test_backup_xml_full_and_incremental_disks():
    xml = backup_job.backup_xml("/s/nbd.sock", [("vda", "/s/vda.scratch", "kvm-borg.A"), ("vdb", "/s/vdb.scratch", None)])
    root = ET.fromstring(xml)
    assert root.tag == "domainbackup" and root.get("mode") == "pull"
    assert root.find("incremental") is None  # per disk, never domain-wide
    server = root.find("server")
    assert (server.get("transport"), server.get("socket")) == ("unix", "/s/nbd.sock")
    vda, vdb = root.findall("./disks/disk")
    assert (vda.get("name"), vda.get("backup"), vda.get("type")) == ("vda", "yes", "file")
    assert (vda.get("backupmode"), vda.get("incremental")) == ("incremental", "kvm-borg.A")
    assert vda.find("scratch").get("file") == "/s/vda.scratch"
    assert (vdb.get("backupmode"), vdb.get("incremental")) == ("full", None)


def test_backup_xml_escapes_paths():
    xml = backup_job.backup_xml("/s/a'b\"<&>.sock", [("vda", "/s/x'&<y>", None)])
    root = ET.fromstring(xml)
    assert root.find("server").get("socket") == "/s/a'b\"<&>.sock"
    assert root.find("./disks/disk/scratch").get("file") == "/s/x'&<y>"


def test_checkpoint_xml_names_every_disk_mode():
    xml = backup_job.checkpoint_xml("kvm-borg.19700101T000000Z.0123abcd", [("vda", "bitmap"), ("vdb", "no")])
    root = ET.fromstring(xml)
    assert root.findtext("name") == "kvm-borg.19700101T000000Z.0123abcd"
    assert [(d.get("name"), d.get("checkpoint")) for d in root.findall("./disks/disk")] == [("vda", "bitmap"), ("vdb", "no")]
    assert backup_job.checkpoint_bitmap_disks(xml) == {"vda"}


def test_checkpoint_xml_refuses_unknown_mode():
    with pytest.raises(ValueError):
        backup_job.checkpoint_xml("kvm-borg.x", [("vda", "yes")])


def test_checkpoint_bitmap_disks_of_libvirts_description():
    described = """<domaincheckpoint><name>kvm-borg.a</name><creationTime>1</creationTime><disks>
      <disk name='vda' checkpoint='bitmap' bitmap='kvm-borg.a'/><disk name='vdb' checkpoint='no'/>
      </disks><domain type='kvm'><name>x</name></domain></domaincheckpoint>"""
    assert backup_job.checkpoint_bitmap_disks(described) == {"vda"}


def test_dac_label_of_live_xml():
    live = """<domain><name>x</name><seclabel type='dynamic' model='apparmor'><label>libvirt-x</label></seclabel>
      <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label>
      <imagelabel>+64055:+64055</imagelabel></seclabel></domain>"""
    assert backup_job.dac_label(live) == "+64055:+64055"
    assert backup_job.parse_owner("+64055:+64055") == (64055, 64055)
    assert backup_job.dac_label("<domain><name>x</name></domain>") is None


def test_parse_owner_by_name():
    assert backup_job.parse_owner("root:root") == (0, 0)
    assert backup_job.parse_owner("0:0") == (0, 0)
    with pytest.raises(KeyError):
        backup_job.parse_owner("no-such-user-kvm-borg:root")


def test_qemu_nbd_exports_read_only_without_locking_and_doubles_commas():
    from kvm_borg.engine import qemu_nbd

    argv = qemu_nbd.qemu_nbd_argv("/img/a,b.qcow2", "qcow2", "/s/vda.sock", "vda", bitmap="kvm-borg.x", connections=4)
    assert argv[:6] == ["qemu-nbd", "--read-only", "--persistent", "--shared=4", "--socket=/s/vda.sock",
                        "--export-name=vda"]
    assert "--bitmap=kvm-borg.x" in argv
    assert argv[-2:] == ["--image-opts", "driver=qcow2,file.driver=file,file.filename=/img/a,,b.qcow2,file.locking=off"]
    plain = qemu_nbd.qemu_nbd_argv("/dev/vg/lv", "raw", "/s/vdb.sock", "vdb", block_device=True)
    assert not any(a.startswith("--bitmap") for a in plain)
    assert plain[-1] == "driver=raw,file.driver=host_device,file.filename=/dev/vg/lv,file.locking=off"


def _plan(method, running=True):
    from kvm_borg.models import DiskPlan, DomainPlan

    return DomainPlan(name="web", uuid="6a0f4b8e-54d6-4c3e-9a55-0c2d1f7f3b11", running=running,
                      disks=(DiskPlan("vda", "/img/a.qcow2", "file", "qcow2"),), skipped=(),
                      overlays={"vda": "/img/a.ov.qcow2"} if running and method == "snapshot" else {},
                      quiesce="auto", method=method)


@pytest.mark.parametrize("method, running, expected", [
    ("bitmap", True, "BitmapSource"), ("bitmap", False, "OfflineBitmapSource"),
    ("snapshot", True, "SnapshotSource"), ("snapshot", False, "OfflineSource")])
def test_the_plugins_pick_the_source_of_the_plans_method(method, running, expected):
    from kvm_borg.plugins import make_plugin_manager

    pm = make_plugin_manager([], entry_points=False)
    source = pm.hook.kvm_borg_frozen_source(domain=object(), plan=_plan(method, running), settings=object())
    assert type(source).__name__ == expected


def test_a_bitmap_entry_is_recovered_by_the_bitmap_plugin_only():
    from kvm_borg import journal
    from kvm_borg.default_plugins import libvirt_bitmap, libvirt_snapshot

    entry = journal.Entry(domain="web", uuid="u", disks=[], source="libvirt-bitmap")
    assert libvirt_snapshot.kvm_borg_recover_entry(entry=entry, connection=None, settings=None) is None
    snapshot_entry = journal.Entry(domain="web", uuid="u", disks=[])
    assert libvirt_bitmap.kvm_borg_recover_entry(entry=snapshot_entry, connection=None, settings=None) is None
