"""meta.json, the archive comment and file list; the plugin registry."""

import json

from kvm_borg import metadata
from kvm_borg.models import DiskPlan, DomainPlan, FreezeResult, FrozenDisk, SkippedDisk
from kvm_borg.default_plugins import DEFAULT_PLUGINS
from kvm_borg.plugins import describe_plugins, make_plugin_manager, notify
from kvm_borg.hookspecs import hookimpl


def _meta():
    plan = DomainPlan("web", "u-1", True, (DiskPlan("vda", "/img/a.qcow2", "file", "qcow2", ("/img/b.raw",)),),
                      (SkippedDisk("hdc", "device is a cdrom"),), {"vda": "/img/a.ov"}, "auto")
    freeze = FreezeResult([FrozenDisk("vda", "/img/a.qcow2", "qcow2", 1 << 30, "/img/a.qcow2", ("/img/b.raw",))],
                          True, "quiesced")
    return metadata.build_meta(plan, freeze, archive="web-20261126T000000Z", timestamp="20261126T000000Z",
                               host="hv1", libvirt_version="9.0.0", qemu_version="7.2.0", persistent=True,
                               staging_dir="/s/u-1", has_live_xml=True)


def test_meta_records_disks_chain_and_consistency():
    meta = _meta()
    disk = meta["disks"][0]
    assert disk["archive_path"] == "img/a.qcow2" and disk["virtual_size"] == 1 << 30
    assert disk["backing_chain"] == [{"path": "/img/b.raw", "archive_path": "img/b.raw"}]
    assert meta["quiesced"] is True and meta["consistency"] == "quiesced"
    assert meta["skipped_disks"] == [{"target": "hdc", "reason": "device is a cdrom"}]
    assert meta["files"] == {"domain_xml": "s/u-1/domain.xml", "domain_live_xml": "s/u-1/domain-live.xml"}


def test_archive_files_put_metadata_first_then_images_and_backing_files():
    files = metadata.archive_files(_meta(), "/s/u-1")
    assert files == ["/s/u-1/meta.json", "/s/u-1/domain.xml", "/s/u-1/domain-live.xml", "/img/a.qcow2", "/img/b.raw"]
    comment = json.loads(metadata.archive_comment(_meta()))
    assert comment == {"kvm_borg": 1, "domain": "web", "uuid": "u-1", "disks": ["vda"], "host": "hv1",
                       "consistency": "quiesced", "method": "snapshot"}


def test_archive_name_and_timestamp_format():
    from datetime import datetime, timezone
    ts = metadata.utc_timestamp(datetime(2026, 11, 26, 12, 16, 38, tzinfo=timezone.utc))
    assert ts == "20261126T121638Z" and metadata.archive_name("web 01", ts) == "web 01-20261126T121638Z"


class Recorder:
    calls = []

    @hookimpl
    def kvm_borg_after_store(self, domain, repository, result):
        self.calls.append((domain, repository, result))

    @hookimpl
    def kvm_borg_on_error(self, domain, stage, error):
        raise RuntimeError("a broken notifier")


def test_builtins_are_plugins_and_notifier_errors_are_not_fatal():
    pm = make_plugin_manager([])
    names = {p["name"] for p in describe_plugins(pm)}
    assert "kvm_borg.default_plugins.libvirt_snapshot" in names and "kvm_borg.backends.borg" in names
    assert all(p["builtin"] for p in describe_plugins(pm) if p["name"] in DEFAULT_PLUGINS)
    recorder = Recorder()
    pm.register(recorder)
    notify(pm, "kvm_borg_after_store", domain="web", repository="r", result=1)
    notify(pm, "kvm_borg_on_error", domain="web", stage="store", error=ValueError())
    assert recorder.calls == [("web", "r", 1)]


def test_config_plugins_are_imported_by_module_name():
    pm = make_plugin_manager(["tests.unit.sample_plugin"])
    assert pm.has_plugin("tests.unit.sample_plugin")
    import pytest
    from kvm_borg.errors import ConfigError
    with pytest.raises(ConfigError, match=r"plugins\[0\]: cannot import plugin module 'no_such_mod'"):
        make_plugin_manager(["no_such_mod"])
