"""Network disks (nbd, rbd, iscsi...): parsed from the domain XML, read only by the bitmap method's backup job
(left out with a warning otherwise), never in a checkpoint unless qcow2 of a known level, recorded in
meta.json as untrusted information, restored to a local file."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from kvm_borg import archive_meta, metadata, method_choice, restore_plan
from kvm_borg.engine import backup_job
from kvm_borg.engine import domain_xml as dx
from kvm_borg.engine import libvirt_bitmap as lb
from kvm_borg.errors import UsageError
from kvm_borg.models import NetworkHost, NetworkSource

DOMAIN = """<domain type='kvm'><name>web</name><devices>
 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/a.qcow2'/>
  <target dev='vda'/></disk>
 <disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='nbd' name='exp'><host name='127.0.0.1' port='10900'/></source><target dev='vdb'/></disk>
 <disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='rbd' name='pool/img'><host name='mon1' port='6789'/><host name='mon2'/></source>
  <auth username='admin'><secret type='ceph' uuid='3e1a4e5c-0000-0000-0000-000000000001'/></auth>
  <target dev='vdc'/></disk>
 <disk type='network' device='disk'><driver name='qemu' type='qcow2'/>
  <source protocol='nbd' name='q'><host transport='unix' socket='/run/nbd.sock'/></source><target dev='vdd'/></disk>
 <disk type='network' device='disk'><source/><target dev='vde'/></disk>
</devices></domain>"""


def test_network_disks_are_candidates_with_their_protocol_name_and_hosts():
    chosen, skipped = dx.choose_disks(DOMAIN)
    by_target = {d.target: d for d in chosen}
    assert list(by_target) == ["vda", "vdb", "vdc", "vdd"]
    assert by_target["vda"].network is None and by_target["vda"].source_type == "file"
    vdb = by_target["vdb"]
    assert (vdb.source_type, vdb.driver_type, vdb.source) == ("network", "raw", "nbd://127.0.0.1:10900/exp")
    assert vdb.network == NetworkSource("nbd", "exp", (NetworkHost("127.0.0.1", "10900"),))
    assert by_target["vdc"].network.hosts == (NetworkHost("mon1", "6789"), NetworkHost("mon2"))
    assert by_target["vdd"].network.hosts == (NetworkHost(transport="unix", socket="/run/nbd.sock"),)
    assert {s.target: s.reason for s in skipped} == {"vde": "network disk without a protocol"}


def test_only_nbd_exports_get_a_url_to_read_a_qcow2_level_from():
    disks = {d.target: d.network for d in dx.choose_disks(DOMAIN)[0] if d.network}
    assert dx.network_image_url(disks["vdb"]) == "nbd://127.0.0.1:10900/exp"
    assert dx.network_image_url(disks["vdd"]) == "nbd+unix:///q?socket=/run/nbd.sock"
    assert dx.network_image_url(disks["vdc"]) is None  # rbd: credentials kvm-borg does not hold
    assert dx.network_image_url(NetworkSource("nbd", "x", (NetworkHost("::1"),))) == "nbd://[::1]:10809/x"


def test_auto_takes_the_backup_job_for_a_running_domain_with_a_network_disk():
    assert method_choice.choose_method("auto", {}, "web", True, [("raw", None)], network=True) == "bitmap"
    assert method_choice.choose_method("auto", {}, "web", True, [("raw", None)], network=False) == "snapshot"
    assert method_choice.choose_method("auto", {}, "web", False, [("raw", None)], network=True) == "snapshot"
    assert method_choice.choose_method("snapshot", {}, "web", True, [("raw", None)], network=True) == "snapshot"


@pytest.mark.parametrize("method, running, configured, why, expected", [
    ("bitmap", True, "auto", None, None),
    ("bitmap", True, "bitmap", None, None),
    ("snapshot", True, "snapshot", None, "set method auto or bitmap"),
    ("snapshot", True, "auto", "no module nbd", "the bitmap method cannot run here (no module nbd)"),
    ("snapshot", False, "auto", None, "shut-off domain"),
    ("bitmap", False, "bitmap", None, "shut-off domain"),
])
def test_a_network_disk_the_method_cannot_read_is_left_out_with_a_reason(method, running, configured, why, expected):
    reason = method_choice.network_disk_reason(method, running, configured, why)
    if expected is None:
        assert reason is None
    else:
        assert reason.startswith("network disk") and expected in reason
        # restore keeps such a disk in a copy's XML like any other network disk it did not restore
        assert restore_plan.removable_skipped_disks({"skipped_disks": [{"target": "vdb", "reason": reason}]}) == []


def test_a_raw_network_disk_is_out_of_the_checkpoint_and_in_the_same_backup_job():
    reason = lb.no_bitmap_reason("raw", None, network=True)
    assert reason == "raw network disk: no bitmap"
    assert "unknown compat" in lb.no_bitmap_reason("qcow2", None, network=True)
    assert lb.no_bitmap_reason("qcow2", "1.1", network=True) is None
    checkpoint = ET.fromstring(backup_job.checkpoint_xml("kvm-borg.x", [("vda", "bitmap"), ("vdb", "no")]))
    assert {d.get("name"): d.get("checkpoint") for d in checkpoint.findall("./disks/disk")} == {"vda": "bitmap",
                                                                                                  "vdb": "no"}
    backup = ET.fromstring(backup_job.backup_xml("/s/nbd.sock", [("vda", "/s/vda.scratch", "kvm-borg.p"),
                                                                 ("vdb", "/s/vdb.scratch", None)]))
    disks = {d.get("name"): d for d in backup.findall("./disks/disk")}
    assert disks["vdb"].get("backupmode") == "full" and disks["vdb"].find("scratch").get("file") == "/s/vdb.scratch"
    assert disks["vda"].get("incremental") == "kvm-borg.p"


def test_meta_records_a_network_disk_without_a_host_path():
    [_, vdb, vdc, _] = dx.choose_disks(DOMAIN)[0]
    assert metadata.network_fields(vdb) == {"network": {"protocol": "nbd", "name": "exp",
                                                        "hosts": [{"name": "127.0.0.1", "port": "10900"}]}}
    assert metadata.network_fields(vdc)["network"]["hosts"] == [{"name": "mon1", "port": "6789"}, {"name": "mon2"}]


def meta(network, original_source=None) -> dict:
    return {"kvm_borg": 1, "domain": {"name": "web", "uuid": "11111111-2222-3333-4444-555555555555"},
            "disks": [{"target": "vdb", "format": "raw", "virtual_size": 1 << 20, "original_source": original_source,
                       "source_type": "network", "archive_path": "view/u/vdb", "layout": "segments",
                       "segments": {"size": 1 << 20, "count": 1}, "network": network}],
            "files": {"domain_xml": "staging/u/domain.xml"}}


NBD = {"protocol": "nbd", "name": "exp", "hosts": [{"name": "127.0.0.1", "port": "10900"}]}


@pytest.mark.parametrize("network", [
    {"protocol": "nbd;rm", "hosts": []},
    {"protocol": "nbd", "name": "x\nDONE", "hosts": []},
    {"protocol": "nbd", "name": "x" * 2000},
    {"protocol": "nbd", "hosts": [{"name": "h", "port": "99999"}]},
    {"protocol": "nbd", "hosts": [{"name": "h", "port": "1 2"}]},
    {"protocol": "nbd", "hosts": [{"transport": "ssh"}]},
    {"protocol": "nbd", "hosts": [{"transport": "unix", "socket": "../x.sock"}]},
    {"protocol": "nbd", "hosts": [{"name": "h"}] * 17},
    {"protocol": 7},
    "nbd://h/x",
])
def test_an_archived_network_entry_is_untrusted_input(network):
    with pytest.raises(UsageError, match="network"):
        archive_meta.check_meta(meta(network))


def test_a_network_disk_needs_no_original_path_but_a_file_disk_still_does():
    archive_meta.check_meta(meta(NBD))
    with pytest.raises(UsageError, match="original source"):
        archive_meta.check_meta(meta(None))
    with pytest.raises(UsageError, match="original source"):
        archive_meta.check_meta(meta(NBD, original_source="relative/path"))


PATHS = frozenset({"view/u/vdb", "staging/u/domain.xml"})


def test_a_whole_domain_restore_writes_a_network_disk_to_a_local_file_and_says_so():
    # in place: the local definition still has vdb on the network, so it is not among the local file disks
    plan = restore_plan.plan_restore(meta(NBD), PATHS, local_disks={}, archive_types={
        "view/u/vdb": "dir", "staging/u/domain.xml": "file"}, image_dir="/var/lib/libvirt/images")
    [disk] = plan.disks
    assert disk.image.destination == "/var/lib/libvirt/images/web-vdb.raw"
    [warning] = plan.warnings
    assert "network disk nbd://127.0.0.1:10900/exp" in warning and "/var/lib/libvirt/images/web-vdb.raw" in warning
    assert "XML points at that file" in warning and "--to DEVICE" in warning
    # the rewritten XML is a file disk on it: no protocol, host or auth from the archive survives
    archived = ("<domain><name>web</name><devices><disk type='network' device='disk'><driver name='qemu' "
                "type='raw'/><source protocol='nbd' name='exp'><host name='10.9.9.9' port='10900'/></source>"
                "<auth username='u'/><target dev='vdb'/></disk></devices></domain>")
    disk_xml = ET.fromstring(restore_plan.rewrite_domain_xml(archived, disks={"vdb": (disk.image.destination, "raw")}))
    disk_xml = disk_xml.find("./devices/disk")
    assert disk_xml.get("type") == "file" and disk_xml.find("source").attrib == {"file": disk.image.destination}
    assert disk_xml.find("source/host") is None


def test_a_copy_writes_a_network_disk_into_the_target_dir():
    plan = restore_plan.plan_restore(meta(NBD), PATHS, target_dir="/restore", new_name="web2")
    assert plan.disks[0].image.destination == "/restore/web2-vdb.raw"
    assert "network disk nbd://" in plan.warnings[0]


def test_the_planner_leaves_out_only_the_network_disks_the_method_cannot_read():
    from types import SimpleNamespace

    from kvm_borg.engine import planning

    disks = dx.choose_disks(DOMAIN)[0]
    settings = SimpleNamespace(method="snapshot", domains_method={"web": "auto"})
    kept, left_out = planning.leave_out_network_disks(settings, "web", True, "bitmap", disks, None)
    assert kept == disks and left_out == []
    kept, left_out = planning.leave_out_network_disks(settings, "db", True, "snapshot", disks, None)
    assert [d.target for d in kept] == ["vda"]
    assert [(s.target, d.source) for s, d in left_out] == [
        ("vdb", "nbd://127.0.0.1:10900/exp"), ("vdc", "rbd://mon1:6789,mon2/pool/img"),
        ("vdd", "nbd:///run/nbd.sock/q")]
    assert all("set method auto or bitmap" in s.reason for s, _ in left_out)
    kept, left_out = planning.leave_out_network_disks(settings, "web", False, "snapshot", disks[:1], None)
    assert kept == disks[:1] and left_out == []  # no network disk: nothing to say


def test_a_network_qcow2_level_is_read_from_its_header_only_and_briefly():
    from kvm_borg.engine import planning

    argv = planning.network_qcow2_compat_argv("nbd://127.0.0.1:10900/exp")
    assert argv == ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", "nbd://127.0.0.1:10900/exp"]
    assert "--backing-chain" not in argv  # a backing file named on the server is never opened here
    assert planning.NETWORK_PROBE_TIMEOUT <= 30
    rbd = next(d for d in dx.choose_disks(DOMAIN)[0] if d.target == "vdc")
    assert planning.disk_qcow2_compat(rbd) is None  # no URL for rbd: nothing is run
