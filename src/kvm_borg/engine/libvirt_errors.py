"""Translate libvirt's exceptions into EngineError at the engine's edge."""

from __future__ import annotations

import contextlib
import functools

import libvirt

from kvm_borg.errors import EngineError


def engine_error(exc: libvirt.libvirtError) -> EngineError:
    """Given a libvirt error, return the EngineError that says it in one line ("libvirt: ...")."""
    return EngineError(f"libvirt: {exc.get_error_message()}")


@contextlib.contextmanager
def translated():
    """Run the block, raising an EngineError (cause: the libvirt error) for any libvirt error it raises."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise engine_error(exc) from exc


def translating(function):
    """Given a function, return it so that a libvirt error it raises comes out as an EngineError."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with translated():
            return function(*args, **kwargs)

    return wrapper
