"""The plugin manager: built-in plugins, entry-point plugins and modules named in the config."""

from __future__ import annotations

import importlib
import logging

import pluggy

from kvm_borg import hookspecs
from kvm_borg.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvm_borg"

# The built-in steps, registered exactly like third-party plugins.
DEFAULT_PLUGINS = (
    "kvm_borg.engine.libvirt_snapshot",
    "kvm_borg.backends.borg",
    "kvm_borg.backends.restic",
    "kvm_borg.backends.borg_schema",
    "kvm_borg.backends.restic_schema",
    "kvm_borg.run_record",
    "kvm_borg.actions.freeze",
)


def _import_optional_builtin(name: str):
    """Given a built-in module name, return the module, or None while it is not written yet."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def make_plugin_manager(config_plugins: list[str] | tuple[str, ...] = (), *, entry_points: bool = True):
    """Given module names from the config's `plugins:`, return a PluginManager with every plugin loaded.

    A module name that cannot be imported is a ConfigError naming it."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        module = _import_optional_builtin(name)
        if module is not None:
            pm.register(module, name=name)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for i, name in enumerate(config_plugins):
        if pm.has_plugin(name):
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins[{i}]: cannot import plugin module {name!r}: {exc}") from None
        pm.register(module, name=name)
    return pm


def describe_plugins(pm: pluggy.PluginManager) -> list[dict]:
    """Given a PluginManager, return [{name, hooks}] for every registered plugin (for `doctor`)."""
    result = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        result.append({"name": name, "hooks": hooks, "builtin": name in DEFAULT_PLUGINS})
    return result


_SETTINGS_ATTRIBUTE = "kvm_borg_settings"


def bind_settings(pm: pluggy.PluginManager, settings) -> None:
    """Given a PluginManager and the run's Settings, let `notify` hand them to notifiers that take `settings`."""
    setattr(pm, _SETTINGS_ATTRIBUTE, settings)


def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs) -> None:
    """Call a notification hook; an exception from one notifier is logged, never fatal.

    A notifier that takes `settings` gets the Settings bound with `bind_settings` (None if none)."""
    hook = getattr(pm.hook, hook_name)
    kwargs.setdefault("settings", getattr(pm, _SETTINGS_ATTRIBUTE, None))
    for impl in reversed(hook.get_hookimpls()):
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as exc:  # a notifier must not break a backup
            log.warning("plugin %s failed in %s: %s", impl.plugin_name, hook_name, exc)
