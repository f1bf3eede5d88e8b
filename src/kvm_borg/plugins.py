"""The plugin manager: built-in plugins (kvm_borg.default_plugins), entry-point plugins and modules named
in the config; `notify` calls notification hooks with every notifier isolated."""

from __future__ import annotations

import importlib
import logging
import types

import pluggy

from kvm_borg import entry_points, hookspecs
from kvm_borg.default_plugins import DEFAULT_PLUGINS
from kvm_borg.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvm_borg"


# What pluggy can take as a hook implementation (pluggy._manager._static_hook_attr); anything else is skipped.
_HOOKABLE = (types.FunctionType, staticmethod, classmethod, types.MethodType)
_ABSENT = object()


class PluginManager(pluggy.PluginManager):
    """pluggy's PluginManager that refuses, at registration, a wrapper (wrapper=True or hookwrapper=True)
    on a notification hook: `notify` calls each notifier on its own, isolated, so such a wrapper
    could never wrap anything, and it must not be skipped silently.

    Registering a module plugin asks `parse_hookimpl_opts` about every name in it; pluggy answers each
    with inspect.getattr_static (~2/3 of the start-up's plugin registration). For a plain module's own
    value that is no function (a class, a constant, an imported module) the answer is known without it."""

    def parse_hookimpl_opts(self, plugin, name):
        """Given a plugin and one of its names, return the hookimpl options as pluggy does (None: not a hook)."""
        if type(plugin) is types.ModuleType and not name.startswith("__"):
            # getattr_static of a plain module gives its own __dict__ value for every name ModuleType and object
            # do not define themselves (those are all dunders)
            value = plugin.__dict__.get(name, _ABSENT)
            if value is not _ABSENT and not isinstance(value, _HOOKABLE):
                return None
        return super().parse_hookimpl_opts(plugin, name)

    def register(self, plugin, name=None):
        """Register `plugin` as pluggy does and return its name; ConfigError (and nothing registered) when
        it wraps a notification hook."""
        plugin_name = super().register(plugin, name)
        if plugin_name is None:
            return None
        wrapped = [caller.name for caller in self.get_hookcallers(plugin) or []
                   if caller.spec is not None and not caller.spec.opts.get("firstresult")
                   and any(impl.plugin is plugin and (impl.wrapper or impl.hookwrapper)
                           for impl in caller.get_hookimpls())]
        if wrapped:
            self.unregister(plugin)
            raise ConfigError(f"plugin {plugin_name}: {', '.join(wrapped)} is a notification hook: it cannot be "
                              "wrapped (wrapper=True / hookwrapper=True); implement it as a plain @hookimpl")
        return plugin_name


def make_plugin_manager(config_plugins: list[str] | tuple[str, ...] = (), *, entry_points: bool = True):
    """Given module names from the config's `plugins:`, return a PluginManager with the built-in plugins
    (kvm_borg.default_plugins), the entry-point plugins and those modules loaded.

    A module name that cannot be imported is a ConfigError naming it, and so is a plugin that wraps a
    notification hook (see PluginManager)."""
    pm = PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if entry_points:
        load_entry_point_plugins(pm)
    for i, name in enumerate(config_plugins):
        if pm.has_plugin(name):
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"plugins[{i}]: cannot import plugin module {name!r}: {exc}") from None
        pm.register(module, name=name)
    return pm


def load_entry_point_plugins(pm: pluggy.PluginManager, directories: list[str] | None = None) -> None:
    """Given a PluginManager, register every plugin installed with an entry point in the `kvm_borg` group (see
    kvm_borg.entry_points; a name already registered or blocked is skipped, as pluggy does). One that cannot
    be imported is a ConfigError naming it and the file that declares it."""
    for entry in entry_points.find(ENTRY_POINT_GROUP, directories):
        if pm.has_plugin(entry.name) or pm.is_blocked(entry.name):
            continue
        try:
            plugin = entry_points.load(entry)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"entry point {entry.name} = {entry.value} ({entry.source}): cannot load it: {exc}") \
                from None
        pm.register(plugin, name=entry.name)


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

    A notifier that takes `settings` gets the Settings bound with `bind_settings` (None if none). No
    notifier is a wrapper: PluginManager refuses those at registration."""
    hook = getattr(pm.hook, hook_name)
    kwargs.setdefault("settings", getattr(pm, _SETTINGS_ATTRIBUTE, None))
    for impl in reversed(hook.get_hookimpls()):
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as exc:  # a notifier must not break a backup
            log.warning("plugin %s failed in %s: %s", impl.plugin_name, hook_name, exc)
