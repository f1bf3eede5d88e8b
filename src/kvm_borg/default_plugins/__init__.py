"""The built-in plugins, registered from DEFAULT_PLUGINS through the same plugin manager and hooks as
third-party ones (kvm_borg.plugins). None of them imports a verb (kvm_borg.actions)."""

DEFAULT_PLUGINS = (
    "kvm_borg.default_plugins.libvirt_bitmap",  # asked first (tryfirst): only plans with method "bitmap"
    "kvm_borg.default_plugins.libvirt_snapshot",
    "kvm_borg.backends.borg",
    "kvm_borg.backends.restic",
    "kvm_borg.backends.borg.schema",
    "kvm_borg.backends.restic.schema",
    "kvm_borg.default_plugins.freeze_exposure",
    "kvm_borg.default_plugins.live_restore",
)
