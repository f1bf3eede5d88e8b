"""The built-in backends implement every RepositoryBackend member callers use, each written out in the
class (no __getattr__), with the parameters the Protocol names."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from kvm_borg.backends.borg.repository import BorgRepository
from kvm_borg.backends.restic.repository import ResticRepository
from kvm_borg.models import RepositoryBackend

SETTINGS = SimpleNamespace(borg_binary=None, restic_binary=None, progress=False, hostname="hv1")
# What the CLI's verbs read of a backend besides the Protocol's methods (the Protocol is being completed to
# declare them all: until then this list keeps them checked).
CALLER_MEMBERS = ("name", "repository", "settings", "location", "host", "list_hosts", "preflight", "version",
                  "list_entries", "stream_file", "mount", "unmount", "command_environment")


def _protocol_members() -> set[str]:
    declared = {name for name, value in vars(RepositoryBackend).items() if not name.startswith("_")}
    return declared | set(RepositoryBackend.__annotations__) | set(CALLER_MEMBERS)


BACKENDS = [
    BorgRepository({"name": "b", "type": "borg", "path": "/srv/borg"}, SETTINGS),
    ResticRepository({"name": "r", "type": "restic", "url": "sftp:u@h:/srv/restic"}, SETTINGS),
]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: type(b).__name__)
def test_every_member_is_written_out_in_the_class(backend):
    assert not hasattr(type(backend), "__getattr__")
    for name in sorted(_protocol_members()):
        in_class = any(name in vars(cls) for cls in type(backend).__mro__ if cls is not object)
        assert in_class or name in vars(backend), f"{type(backend).__name__} lacks {name}"


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: type(b).__name__)
def test_every_method_takes_the_protocols_parameters_and_says_what_it_does(backend):
    for name, declared in vars(RepositoryBackend).items():
        if name.startswith("_") or not inspect.isfunction(declared):
            continue
        method = getattr(type(backend), name)
        wanted = [p for p in inspect.signature(declared).parameters if p != "self"]
        taken = inspect.signature(method).parameters
        assert all(p in taken for p in wanted), f"{type(backend).__name__}.{name} does not take {wanted}"
        assert method.__doc__, f"{type(backend).__name__}.{name} has no docstring"


def test_both_backends_hand_run_command_the_same_keywords():
    borg, restic = BACKENDS[0], BACKENDS[1]
    assert set(borg.command_environment()) == set(restic.command_environment()) == {"env", "secret", "secret_env"}
    assert restic.command_environment()["env"]["RESTIC_REPOSITORY"] == "sftp:u@h:/srv/restic"
    assert borg.host == restic.host == "hv1"


def test_a_third_party_backend_without_stream_tar_says_it_cannot_read_segmented_disks():
    from kvm_borg.errors import UsageError
    from kvm_borg.models import BackendBase

    backend = BackendBase({"name": "x", "type": "dirstore"}, SETTINGS)
    with pytest.raises(UsageError, match="repository 'x' \\(dirstore\\) cannot read segmented disks"):
        backend.stream_tar("a", "d", lambda data: None)
