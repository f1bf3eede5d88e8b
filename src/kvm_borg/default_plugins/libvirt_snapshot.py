"""Built-in plugin: the libvirt snapshot engine (kvm_borg.engine.libvirt_snapshot) as the FrozenSource
of every domain, and the recovery of the journal entries it writes."""

from kvm_borg.engine.libvirt_snapshot import SOURCE_NAME, OfflineSource, SnapshotSource, bring_back_to_base
from kvm_borg.hookspecs import hookimpl


@hookimpl
def kvm_borg_frozen_source(domain, plan, settings):
    """The built-in source: a snapshot for a running domain, the images themselves for a shut-off one."""
    return SnapshotSource(domain, plan, settings) if plan.running else OfflineSource(domain, plan, settings)


@hookimpl
def kvm_borg_recover_entry(entry, connection, settings):
    """Complete an entry this engine wrote (merge back, drop the entry); other sources' entries are left
    to their plugins."""
    if entry.source != SOURCE_NAME:
        return None
    return bring_back_to_base(entry, connection, settings)
