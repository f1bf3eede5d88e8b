"""kvm-borg: crash-safe backup of live libvirt domains into Borg or restic repositories."""

__version__ = "0.1.0"
