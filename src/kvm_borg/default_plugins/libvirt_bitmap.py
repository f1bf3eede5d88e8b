"""Built-in plugin: the bitmap engine (kvm_borg.engine.libvirt_bitmap) as the FrozenSource of a running
domain whose plan says method "bitmap", and the recovery of the journal entries it writes. Asked before
the snapshot plugin (tryfirst); it returns None for every other plan, which the snapshot plugin takes.
The engine is imported only when a bitmap run or entry needs it."""

from kvm_borg.hookspecs import hookimpl

SOURCE_NAME = "libvirt-bitmap"  # == kvm_borg.engine.libvirt_bitmap.SOURCE_NAME


@hookimpl(tryfirst=True)
def kvm_borg_frozen_source(domain, plan, settings):
    """For a plan with method "bitmap": a BitmapSource (running domain) or an OfflineBitmapSource (shut
    off); None for every other plan."""
    if getattr(plan, "method", "snapshot") != "bitmap":
        return None
    from kvm_borg.engine.libvirt_bitmap import BitmapSource, OfflineBitmapSource

    return BitmapSource(domain, plan, settings) if plan.running else OfflineBitmapSource(domain, plan, settings)


@hookimpl
def kvm_borg_recover_entry(entry, connection, settings):
    """Complete an entry the bitmap engine wrote (stop its view, end its job, tidy its checkpoints and
    scratch dir, drop it); other sources' entries are left to their plugins."""
    if entry.source != SOURCE_NAME:
        return None
    from kvm_borg.engine.libvirt_bitmap import recover_bitmap_entry

    return recover_bitmap_entry(entry, connection, settings)
