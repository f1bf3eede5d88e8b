"""Built-in plugin: the recovery of the journal entries a live restore (`kvm-borg restore --live`) writes:
re-expose the archive if its mount is gone, resume the guest, finish the pull, withdraw the exposure
(kvm_borg.pipeline.live_restore.recover_live_restore). Imported only when such an entry needs it."""

from kvm_borg.hookspecs import hookimpl

SOURCE_NAME = "live-restore"  # == kvm_borg.live_restore_plan.SOURCE_NAME


@hookimpl
def kvm_borg_recover_entry(entry, connection, settings):
    """Complete a live restore's entry; other sources' entries are left to their plugins."""
    if entry.source != SOURCE_NAME:
        return None
    from kvm_borg.pipeline.live_restore import recover_live_restore

    return recover_live_restore(entry, connection, settings)
