"""`kvm-borg freeze` entries complete through the recover hook whichever source froze the domain: the
built-in freeze_exposure wrapper withdraws the exposure first, the source's plugin releases, then the
exposure record goes."""

from types import SimpleNamespace

from kvm_borg import journal
from kvm_borg.models import RecoveryReport
from kvm_borg.hookspecs import hookimpl
from kvm_borg.pipeline import exposure
from kvm_borg.plugins import make_plugin_manager


class ChangedBlocksPlugin:
    """A second source's plugin: releases its own entries; records what it saw."""

    def __init__(self, settings):
        self.settings, self.seen = settings, []

    @hookimpl
    def kvm_borg_recover_entry(self, entry, connection, settings):
        if entry.source != "changed-blocks":
            return None
        # the exposure is withdrawn before the source releases: its domain directory is gone
        self.seen.append((entry.domain, (settings.state_dir / "expose" / entry.domain).exists()))
        report = RecoveryReport(entry.domain)
        report.did("released the changed-block source")
        return report


def settings(tmp_path):
    return SimpleNamespace(state_dir=tmp_path / "state", journal_dir=tmp_path / "state" / "journal")


def test_an_exposed_entry_of_any_source_is_withdrawn_then_released_then_its_record_removed(tmp_path):
    s = settings(tmp_path)
    domain_dir = s.state_dir / "expose" / "web"
    domain_dir.mkdir(parents=True)
    exposure.write_marker(domain_dir, {"run": "r1", "domain": "web", "uuid": "u-1", "files": ["meta.json"]})
    (domain_dir / "meta.json").write_text("{}")
    exposure.write_record(s, {"domain": "web", "uuid": "u-1", "expose_dir": str(domain_dir.parent),
                              "domain_dir": str(domain_dir), "running": True, "mounts": [], "images": {},
                              "marker": "r1"})
    entry = journal.Entry(domain="web", uuid="u-1", disks=[], source="changed-blocks", owner=exposure.OWNER)
    pm = make_plugin_manager(entry_points=False)
    plugin = ChangedBlocksPlugin(s)
    pm.register(plugin)
    report = pm.hook.kvm_borg_recover_entry(entry=entry, connection=None, settings=s)
    assert plugin.seen == [("web", False)]
    assert report.actions == [f"removed {domain_dir}", "released the changed-block source"]
    assert exposure.read_records(s) == []


def test_an_entry_nobody_owns_passes_through_to_its_source_untouched(tmp_path):
    s = settings(tmp_path)
    pm = make_plugin_manager(entry_points=False)
    plugin = ChangedBlocksPlugin(s)
    pm.register(plugin)
    entry = journal.Entry(domain="db", uuid="u-2", disks=[], source="changed-blocks")
    report = pm.hook.kvm_borg_recover_entry(entry=entry, connection=None, settings=s)
    assert report.actions == ["released the changed-block source"] and plugin.seen == [("db", False)]


def test_an_entry_written_before_owner_existed_reads_as_the_snapshot_sources_owned_by_freeze():
    data = {"domain": "web", "uuid": "u-1", "disks": [], "source": "kvm-borg-freeze", "stage": "exposed",
            "pid": 1, "created": 1.0, "version": 1}
    entry = journal.Entry.from_dict(data)
    assert (entry.source, entry.owner) == ("libvirt-snapshot", exposure.OWNER)
