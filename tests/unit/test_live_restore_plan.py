"""kvm_borg.live_restore_plan: the live restore's pure decisions (disks it serves, local images, qemu-img argv,
the XML its domain runs on, who reads a repository), and the mount argv of a shared exposure."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from kvm_borg import live_restore_plan as lrp
from kvm_borg.backends.borg.commands import make_mount_command as borg_mount
from kvm_borg.backends.restic.commands import make_mount_command as restic_mount
from kvm_borg.errors import UsageError
from kvm_borg.restore_plan import RestoreDisk, RestoreFile

DOMAIN = """<domain type='kvm'><name>web-copy</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='writeback'/>
<source file='/img/web-copy-vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/img/web-copy-vdb.qcow2'/><target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda' bus='sata'/></disk>
</devices></domain>"""


def disk(target="vda", fmt="qcow2", **kw) -> RestoreDisk:
    return RestoreDisk(target, fmt, RestoreFile(f"var/lib/x/{target}.{fmt}", f"/img/c-{target}.{fmt}"), 1 << 30, **kw)


def test_whole_images_are_served_in_their_own_format_segmented_ones_as_raw():
    assert lrp.check_live_disk(disk(fmt="qcow2")) == "qcow2"
    assert lrp.check_live_disk(disk(fmt="raw")) == "raw"
    assert lrp.check_live_disk(disk(fmt="qcow2", layout="segments", segment_size=1 << 26, segment_count=16)) == "raw"


@pytest.mark.parametrize("bad, message", [
    (dict(fmt="vmdk"), "raw and qcow2 images only"),
    (dict(backing=((RestoreFile("a/base.qcow2", "/img/b.qcow2"), "qcow2"),)), "has backing files in the archive"),
])
def test_a_disk_the_live_restore_cannot_serve_is_refused(bad, message):
    with pytest.raises(UsageError, match=message):
        lrp.check_live_disk(disk(**bad))


def test_the_local_image_is_a_qcow2_beside_the_restore_destination():
    assert lrp.local_image("/img/web-copy-vdb.raw") == "/img/web-copy-vdb.qcow2"
    assert lrp.local_image("/img/web-copy-vda.qcow2") == "/img/web-copy-vda.qcow2"


def test_the_local_image_never_opens_its_backing_file_when_created():
    argv = lrp.overlay_argv("/img/l.qcow2", "/s/live/u/archive/var/vda.raw", "raw", 67108864)
    assert argv == ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
                    "/s/live/u/archive/var/vda.raw", "/img/l.qcow2", "67108864"]


def test_the_live_xml_names_the_whole_chain_pauses_on_errors_and_leaves_the_archive_unlabelled():
    xml = lrp.live_domain_xml(DOMAIN, {"vda": ("/s/a/vda.qcow2", "qcow2"), "vdb": ("/s/i/vdb.raw", "raw")})
    disks = {d.find("target").get("dev"): d for d in ET.fromstring(xml).findall("./devices/disk")}
    for target, (path, fmt) in {"vda": ("/s/a/vda.qcow2", "qcow2"), "vdb": ("/s/i/vdb.raw", "raw")}.items():
        node = disks[target]
        driver = node.find("driver")
        assert driver.get("error_policy") == "stop" and driver.get("rerror_policy") == "stop"
        store = node.find("backingStore")
        assert store.get("type") == "file" and store.find("format").get("type") == fmt
        assert store.find("source").get("file") == path
        label = store.find("source/seclabel")
        assert label.get("model") == "dac" and label.get("relabel") == "no"
        end = store.find("backingStore")
        assert end is not None and len(end) == 0 and not end.attrib  # the chain ends: nothing from a header
        assert list(node).index(store) == list(node).index(node.find("source")) + 1
    assert disks["vda"].find("driver").get("cache") == "writeback"
    assert disks["sda"].find("backingStore") is None and disks["sda"].find("driver") is None
    assert lrp.targets_with_backing(xml) == {"vda", "vdb"}


def test_a_backing_store_without_source_is_the_end_of_a_chain_not_a_backing_file():
    flat = DOMAIN.replace("<target dev='vda' bus='virtio'/>", "<backingStore/><target dev='vda' bus='virtio'/>")
    assert lrp.targets_with_backing(flat) == set()


def test_without_backing_drops_only_the_named_disks_backing_stores():
    xml = lrp.live_domain_xml(DOMAIN, {"vda": ("/s/a", "raw"), "vdb": ("/s/b", "raw")})
    assert lrp.targets_with_backing(lrp.without_backing(xml, {"vda"})) == {"vdb"}


def test_readers_of_a_repository_are_its_unfinished_live_restores():
    entries = [SimpleNamespace(source="live-restore", domain="a", extra={"repository": "local"}),
               SimpleNamespace(source="live-restore", domain="b", extra={"repository": "offsite"}),
               SimpleNamespace(source="libvirt-snapshot", domain="c", extra={})]
    assert [e.domain for e in lrp.readers_of(entries, "local")] == ["a"]
    assert lrp.readers_of(entries, "nowhere") == []


def test_dac_base_label():
    assert lrp.parse_dac_label("+64055:+108") == (64055, 108)
    assert lrp.parse_dac_label("107:107") == (107, 107)
    assert lrp.parse_dac_label("libvirt-qemu:kvm") is None


def test_a_shared_exposure_lets_qemu_read_and_the_default_stays_private():
    assert borg_mount("borg", "/r", "a1", "/m")[-3:] == ("ro", "/r::a1", "/m")
    assert borg_mount("borg", "/r", "a1", "/m", shared=True)[-3:] == ("ro,allow_other,ignore_permissions", "/r::a1",
                                                                      "/m")
    assert restic_mount("restic", "/m") == ("restic", "mount", "--", "/m")
    shared = restic_mount("restic", "/m", shared=True)
    assert shared[-4:] == ("--allow-other", "--no-default-permissions", "--", "/m")


class _NoPruneBackend:
    """A backend that fails the test if prune or compact is asked for."""

    name = "local"

    def list_archives(self, _domain):
        return []

    def prune(self, *_a, **_k):
        raise AssertionError("prune ran during a live restore")

    def compact(self):
        raise AssertionError("compact ran during a live restore")


def test_prune_refuses_a_repository_an_unfinished_live_restore_reads(tmp_path):
    from kvm_borg import journal
    from kvm_borg.pipeline.prune import failures, prune_repository

    settings = SimpleNamespace(journal_dir=tmp_path / "journal", retention={}, domains_retention={})
    entry = journal.Entry(domain="web-copy", uuid="8f2d1c3e-0000-4000-8000-000000000001", disks=[],
                          source=lrp.SOURCE_NAME, extra={"repository": "local", "archive": "web-2026"})
    journal.write_entry(settings.journal_dir, entry)
    outcome = prune_repository(settings, {"name": "local"}, _NoPruneBackend(), ["web"], dry_run=False)
    assert "live restore of domain 'web-copy'" in outcome["error"] and "web-2026" in outcome["error"]
    assert failures([outcome]) and not outcome["compacted"]
    # Another repository, and the same one once the entry is gone, are pruned as usual.
    assert prune_repository(settings, {"name": "offsite"}, _NoPruneBackend(), [], dry_run=False)["error"] is None
    journal.remove_entry(settings.journal_dir, entry.uuid)
    assert prune_repository(settings, {"name": "local"}, _NoPruneBackend(), [], dry_run=False)["error"] is None


@pytest.mark.parametrize("options, message", [
    (dict(disks=["vda"]), "no --disk or --to"),
    (dict(disks=["vda"], to="/tmp/x"), "no --disk or --to"),
    (dict(overwrite=True), "no --overwrite"),
])
def test_a_live_restore_refuses_the_options_it_does_not_take(options, message):
    from kvm_borg.pipeline.live_restore import check_live_options
    from kvm_borg.pipeline.restore import RestoreOptions

    with pytest.raises(UsageError, match=message):
        check_live_options(RestoreOptions(domain="web", **options))
    check_live_options(RestoreOptions(domain="web", name="web-copy", target_dir="/srv/r"))


def test_the_exposure_lives_under_state_dir_live_by_uuid():
    from pathlib import Path

    from kvm_borg.pipeline.live_restore import exposure_paths

    paths = exposure_paths(Path("/var/lib/kvm-borg"), "8f2d1c3e-0000-4000-8000-000000000001")
    assert paths.directory == "/var/lib/kvm-borg/live/8f2d1c3e-0000-4000-8000-000000000001"
    assert paths.record == paths.directory + ".json" and paths.work == paths.directory + ".work"
    assert paths.archive == paths.directory + "/archive" and paths.images == paths.directory + "/images"


def test_a_local_image_takes_at_most_its_virtual_size_and_its_qcow2_metadata():
    assert lrp.local_image_bound(0) == 1 << 20
    size = 1 << 40  # 1 TiB: 16 Mi clusters, 128 MiB of L2 tables, 32 MiB of refcounts
    assert size + (128 + 32) * 2**20 < lrp.local_image_bound(size) < size + size // 1000


def test_the_space_needed_is_summed_per_file_system_the_images_go_to():
    filesystems = {"/img/a": ("fs1", "/img/a"), "/img/b": ("fs1", "/img/b"), "/other": ("fs2", "/other")}
    needs = lrp.space_needed({"/img/a/x-vda.qcow2": 10 << 30, "/img/b/x-vdb.qcow2": 1 << 30,
                              "/other/x-vdc.qcow2": 0}, filesystems.__getitem__)
    assert needs == {"fs1": ("/img/a", lrp.local_image_bound(10 << 30) + lrp.local_image_bound(1 << 30)),
                     "fs2": ("/other", lrp.local_image_bound(0))}


def test_a_live_restore_without_room_for_its_pulled_disks_is_refused_in_one_line():
    needs = {"fs1": ("/img", 3 << 30), "fs2": ("/other", 1 << 20)}
    assert lrp.space_refusal(needs, {"fs1": 3 << 30, "fs2": 1 << 20}) is None
    refusal = lrp.space_refusal(needs, {"fs1": (3 << 30) - 1, "fs2": 1 << 30})
    assert refusal == (f"not enough free space in /img for a live restore: its pulled disks need up to {3 << 30} bytes "
                       f"(3.00 GiB), {(3 << 30) - 1} bytes (3.00 GiB) are free; make room or choose another --target-dir")
    assert "\n" not in refusal
    assert "/other" in lrp.space_refusal(needs, {"fs1": 3 << 30, "fs2": 0})


def test_backing_sources_name_each_disks_first_backing_file():
    live = lrp.live_domain_xml(DOMAIN, {"vda": ("/live/u/archive/vda.qcow2", "qcow2")})
    assert lrp.backing_sources(live) == {"vda": "/live/u/archive/vda.qcow2"}
    assert lrp.backing_sources(DOMAIN) == {}
