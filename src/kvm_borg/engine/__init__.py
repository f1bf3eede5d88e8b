"""The built-in libvirt engine: disk choice, snapshot, blockcommit, recovery."""
