"""kvm_borg.plugins.PluginManager answers `parse_hookimpl_opts` exactly as pluggy does (its shortcut for
a module's plain values changes no answer), for every name of every built-in plugin and for the odd kinds
of value a module can hold."""

from __future__ import annotations

import functools
import importlib
import types

import pluggy

from kvm_borg import hookspecs
from kvm_borg.default_plugins import DEFAULT_PLUGINS
from kvm_borg.hookspecs import hookimpl
from kvm_borg.plugins import PluginManager, make_plugin_manager


def odd_module() -> types.ModuleType:
    """A module holding every kind of value pluggy distinguishes, marked and not."""
    module = types.ModuleType("kvm_borg_test_odd_plugin")

    @hookimpl
    def kvm_borg_backup_finished(summary, settings):
        return None

    @hookimpl(specname="kvm_borg_before_commit")
    def renamed(domain, disks):
        return None

    class Holder:
        @staticmethod
        def static_impl(plan):
            return None

        @classmethod
        def class_impl(cls, plan):
            return None

        @hookimpl
        def method(self, plan):
            return None

    Holder.static_impl.kvm_borg_impl = {}  # marked below the staticmethod wrapper
    module.__dict__.update(
        kvm_borg_backup_finished=kvm_borg_backup_finished, renamed=renamed, plain=lambda: None,
        marked_class=hookimpl(type("Marked", (), {})), static=Holder.__dict__["static_impl"],
        klass=Holder.__dict__["class_impl"], bound=Holder().method, partial=functools.partial(renamed),
        constant=3, text="kvm_borg_backup_finished", submodule=types, Holder=Holder)
    return module


def test_every_answer_is_pluggys_own():
    ours, theirs = PluginManager(hookspecs.PROJECT_NAME), pluggy.PluginManager(hookspecs.PROJECT_NAME)
    modules = [importlib.import_module(name) for name in DEFAULT_PLUGINS] + [odd_module()]
    asked = found = 0
    for module in modules:
        for name in dir(module):
            expected = theirs.parse_hookimpl_opts(module, name)
            assert ours.parse_hookimpl_opts(module, name) == expected, (module.__name__, name)
            asked, found = asked + 1, found + (expected is not None)
    assert asked > 100 and found >= 10  # the comparison saw hooks and many non-hooks


def test_the_odd_modules_hooks_are_registered_as_pluggy_registers_them():
    pm = make_plugin_manager(entry_points=False)
    pm.register(odd_module(), name="odd")
    impls = {caller.name: [i.function.__name__ for i in caller.get_hookimpls() if i.plugin_name == "odd"]
             for caller in pm.get_hookcallers(pm.get_plugin("odd"))}
    assert impls["kvm_borg_backup_finished"] == ["kvm_borg_backup_finished"]
    assert impls["kvm_borg_before_commit"] == ["renamed"]
