"""A third-party plugin module that (wrongly) wraps a notification hook: make_plugin_manager refuses it."""

from kvm_borg.hookspecs import hookimpl


@hookimpl(wrapper=True)
def kvm_borg_before_commit(domain, disks):
    return (yield)
