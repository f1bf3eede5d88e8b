"""Disk choice, snapshot XML and offline-recovery rewrites, from XML text alone."""

import xml.etree.ElementTree as ET

from kvm_borg.engine import domain_xml as dx

DOMAIN = """<domain type='kvm'><name>web 01</name><uuid>u-1</uuid>
<os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
<nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
<devices>
 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/a.qcow2'/>
  <backingStore type='file'><format type='raw'/><source file='/img/base.raw'/><backingStore/></backingStore>
  <target dev='vda' bus='virtio'/></disk>
 <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/lv'/><target dev='vdb'/></disk>
 <disk type='file' device='cdrom'><target dev='hdc'/><readonly/></disk>
 <disk type='network' device='disk'><source protocol='rbd' name='p/x'/><target dev='vdc'/></disk>
 <disk type='file' device='disk'><source file='/img/shared.raw'/><target dev='vdd'/><shareable/></disk>
 <disk type='file' device='disk'><source file='/img/ro.raw'/><target dev='vde'/><readonly/></disk>
 <disk type='file' device='floppy'><source file='/img/f.img'/><target dev='fda'/></disk>
 <disk type='file' device='lun'><source file='/img/l.img'/><target dev='sda'/></disk>
 <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


def test_backs_up_file_and_block_disks_and_says_why_others_are_skipped():
    chosen, skipped = dx.choose_disks(DOMAIN)
    assert [(d.target, d.source, d.source_type, d.driver_type) for d in chosen] == [
        ("vda", "/img/a.qcow2", "file", "qcow2"),
        ("vdb", "/dev/vg/lv", "block", "raw"),
        ("vdc", "rbd:///p/x", "network", "raw"),  # kept or left out by the method (test_network_disks.py)
    ]
    assert chosen[0].backing_chain == ("/img/base.raw",)
    reasons = {s.target: s.reason for s in skipped}
    assert reasons == {
        "hdc": "device is a cdrom",
        "vdd": "shareable disk",
        "vde": "read-only disk",
        "fda": "device is a floppy",
        "sda": "device is a lun",
    }


def test_configured_exclusions_are_skipped_with_reason():
    chosen, skipped = dx.choose_disks(DOMAIN, ["vdb", "vdc"])
    assert [d.target for d in chosen] == ["vda"]
    assert dx.SkippedDisk("vdb", "excluded by configuration") in skipped
    assert dx.SkippedDisk("vdc", "excluded by configuration") in skipped  # a network disk too


def test_snapshot_xml_names_every_disk_and_gives_explicit_overlays():
    xml = dx.snapshot_xml("s1", ["vda", "vdb", "hdc"], {"vda": "/o/a.ov", "vdb": "/o/b.ov"})
    root = ET.fromstring(xml)
    disks = {d.get("name"): d for d in root.findall("./disks/disk")}
    assert disks["vda"].get("snapshot") == "external"
    assert disks["vda"].find("source").get("file") == "/o/a.ov"
    assert disks["vda"].find("driver").get("type") == "qcow2"
    assert disks["vdb"].find("source").get("file") == "/o/b.ov"
    assert disks["hdc"].get("snapshot") == "no"


def test_overlay_paths_next_to_image_in_overlay_dir_or_fallback_for_block_devices():
    ts = "20261126T121638Z"
    assert dx.overlay_path("/img/a.qcow2", "file", None, "/state/overlays", ts) == f"/img/a.qcow2.kvm-borg-{ts}.qcow2"
    assert dx.overlay_path("/img/a.qcow2", "file", "/ov", "/s", ts) == f"/ov/a.qcow2.kvm-borg-{ts}.qcow2"
    assert dx.overlay_path("/dev/vg/lv", "block", None, "/s/overlays", ts) == f"/s/overlays/lv.kvm-borg-{ts}.qcow2"
    assert dx.is_overlay_path(f"/img/a.qcow2.kvm-borg-{ts}.qcow2")
    assert not dx.is_overlay_path("/img/a.qcow2")
    assert not dx.is_overlay_path(None)


def test_rewrite_disk_source_restores_type_driver_and_drops_backing_store():
    live_on_overlay = DOMAIN.replace("/img/a.qcow2", "/img/a.qcow2.kvm-borg-20261126T121638Z.qcow2")
    xml = dx.rewrite_disk_source(live_on_overlay, "vdb", "/dev/vg/lv", "block", "raw")
    xml = dx.rewrite_disk_source(xml, "vda", "/img/a.qcow2", "file", "qcow2")
    disks = {d.target: d for d in dx.parse_disks(xml)}
    assert disks["vda"].source == "/img/a.qcow2" and disks["vda"].backing_chain == ()
    assert disks["vdb"].source == "/dev/vg/lv" and disks["vdb"].disk_type == "block"
    raw = dx.rewrite_disk_source(DOMAIN, "vda", "/img/base.raw", "file", "raw")
    assert {d.target: d.driver_type for d in dx.parse_disks(raw)}["vda"] == "raw"


def test_domain_selection_globs():
    assert dx.domain_selected("web01", ["*"], [])
    assert not dx.domain_selected("web01", ["*"], ["web*"])
    assert dx.domain_selected("db1", ["db*", "web*"], ["web*"])
    assert not dx.domain_selected("mail", ["db*"], [])


def test_mirror_ready_flag_and_firmware_and_agent_channel():
    xml = DOMAIN.replace("<target dev='vda' bus='virtio'/>",
                         "<target dev='vda' bus='virtio'/><mirror type='file' job='active-commit' ready='yes'/>")
    vda = dx.parse_disks(xml)[0]
    assert vda.mirror and vda.mirror_ready
    assert dx.firmware_files(DOMAIN)["nvram"] == "/var/lib/libvirt/qemu/nvram/web_VARS.fd"
    assert dx.firmware_files(DOMAIN)["loader_type"] == "pflash"
    assert dx.has_guest_agent_channel(DOMAIN)
