"""A third-party plugin as a user would write it, loaded by module name from `plugins:`."""

from kvm_borg.hookspecs import hookimpl

seen = []


@hookimpl
def kvm_borg_after_snapshot(domain, disks, quiesced, seconds):
    seen.append(domain)
