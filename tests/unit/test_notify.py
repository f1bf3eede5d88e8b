"""Notification hooks: a failing notifier is isolated; a wrapper on a notification hook is refused at
registration (one line naming plugin and hook), never silently skipped; wrappers on choosing hooks work."""

import logging

import pytest

from kvm_borg.errors import ConfigError
from kvm_borg.hookspecs import hookimpl
from kvm_borg.plugins import make_plugin_manager, notify


class NewStyleWrapper:
    @hookimpl(wrapper=True)
    def kvm_borg_after_store(self, domain, repository, result):
        return (yield)


class OldStyleWrapper:
    @hookimpl(hookwrapper=True)
    def kvm_borg_backup_finished(self, summary):
        yield


class Failing:
    @hookimpl
    def kvm_borg_after_store(self, domain, repository, result):
        raise RuntimeError("a broken notifier")


class Recording:
    def __init__(self):
        self.calls = []

    @hookimpl
    def kvm_borg_after_store(self, domain, repository, result, settings):
        self.calls.append((domain, repository, result, settings))


@pytest.mark.parametrize("plugin, hook", [(NewStyleWrapper(), "kvm_borg_after_store"),
                                          (OldStyleWrapper(), "kvm_borg_backup_finished")])
def test_a_wrapper_on_a_notification_hook_is_refused_at_registration(plugin, hook):
    pm = make_plugin_manager(entry_points=False)
    with pytest.raises(ConfigError) as refused:
        pm.register(plugin, name="acme.notify")
    assert str(refused.value).startswith(f"plugin acme.notify: {hook} is a notification hook: it cannot be wrapped")
    assert not pm.has_plugin("acme.notify") and pm.get_plugin("acme.notify") is None


def test_a_config_plugin_module_with_a_notification_wrapper_is_a_config_error():
    with pytest.raises(ConfigError, match="tests.unit.wrapping_plugin: kvm_borg_before_commit is a notification hook"):
        make_plugin_manager(["tests.unit.wrapping_plugin"], entry_points=False)


def test_a_failing_notifier_is_logged_and_the_others_still_run(caplog):
    pm = make_plugin_manager(entry_points=False)
    recording = Recording()
    pm.register(Failing(), name="failing")
    pm.register(recording, name="recording")
    with caplog.at_level(logging.WARNING, logger="kvm_borg.plugins"):
        notify(pm, "kvm_borg_after_store", domain="web", repository="r", result="stored")
    assert recording.calls == [("web", "r", "stored", None)]
    assert "plugin failing failed in kvm_borg_after_store: a broken notifier" in caplog.text


def test_a_wrapper_on_a_choosing_hook_wraps_the_chosen_result():
    class Chooser:
        @hookimpl
        def kvm_borg_repository_backend(self, repository, settings):
            return "inner" if repository["type"] == "tape" else None

    class Wrapper:
        @hookimpl(wrapper=True)
        def kvm_borg_repository_backend(self, repository, settings):
            chosen = yield
            return None if chosen is None else f"wrapped({chosen})"

    pm = make_plugin_manager(entry_points=False)
    pm.register(Chooser())
    pm.register(Wrapper())
    assert pm.hook.kvm_borg_repository_backend(repository={"type": "tape"}, settings=None) == "wrapped(inner)"
