"""The whole plugin contract of kvm-borg.

A plugin is any object or module with functions marked ``@hookimpl`` whose names match the
hooks below. The built-in plugins (kvm_borg.default_plugins: the libvirt snapshot engine, the borg
and restic backends, the freeze exposure's recovery) are plugins like any other; third-party ones load from the ``kvm_borg`` entry-point group and from the module
names listed under ``plugins:`` in the configuration.

Two kinds of hook:
- *choosing* hooks (``firstresult=True``): the first plugin that returns something other than
  ``None`` wins (a backend for a repository type, the source of a domain's frozen disk data);
- *notification* hooks: every plugin is called, return values are ignored, and an exception
  raised by a notifier is logged without stopping the backup; a wrapper implementation of one is
  refused at registration (kvm_borg.plugins.PluginManager). Every notification hook also
  offers ``settings`` (the run's Settings; an implementation takes only the arguments it names).
"""

import pluggy

PROJECT_NAME = "kvm_borg"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- choosing hooks -------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvm_borg_repository_backend(repository, settings):
    """Given a repository config dict and the Settings, return a RepositoryBackend for its ``type`` or None."""


@hookspec(firstresult=True)
def kvm_borg_frozen_source(domain, plan, settings):
    """Given a DomainHandle and its DomainPlan, return a FrozenSource that freezes and releases its disks, or None."""


@hookspec(firstresult=True)
def kvm_borg_recover_entry(entry, connection, settings):
    """Given a journal Entry left by an interrupted run, complete it and return a RecoveryReport, or None if not ours."""


# --- notification hooks ---------------------------------------------------------------------


@hookspec
def kvm_borg_before_snapshot(domain, disks, quiesce, settings):
    """Called before a domain's disks are frozen: its name, the chosen DiskPlans, the quiesce mode."""


@hookspec
def kvm_borg_after_snapshot(domain, disks, quiesced, seconds, settings):
    """Called once the disks are frozen: FrozenDisks, whether the guest was quiesced, seconds taken."""


@hookspec
def kvm_borg_after_store(domain, repository, result, settings):
    """Called after one repository stored (or failed to store) a domain's archive: a StoreResult."""


@hookspec
def kvm_borg_before_commit(domain, disks, settings):
    """Called before overlays are merged back into the domain's images: the FrozenDisks."""


@hookspec
def kvm_borg_after_commit(domain, disks, seconds, settings):
    """Called after every overlay has been merged back and removed, with the seconds taken."""


@hookspec
def kvm_borg_on_error(domain, stage, error, settings):
    """Called when a stage (plan, snapshot, store, commit, recover) fails, with the exception."""


@hookspec
def kvm_borg_backup_finished(summary, settings):
    """Called once per ``kvm-borg backup`` run with the RunSummary of every domain and repository."""


# --- configuration --------------------------------------------------------------------------


@hookspec
def kvm_borg_config_schema():
    """Return the config keys this plugin adds, as JSON schemas (see kvm_borg.config_schema for the
    building blocks and annotations): ``{"keys": {top-level key: schema}, "repository_types": {type:
    {"properties": {...}, "required": [...], "allOf": [...], "examples": [...]}}}``; either part may be
    left out. A repository type's schema names only its own keys (``name`` and ``type`` are common)."""
