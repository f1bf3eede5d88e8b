"""Signal handling: SIGTERM/SIGINT/SIGHUP become an `Interrupted` exception so every `finally`
runs, except inside `shielded()` blocks (merging overlays back), where they wait until the end.

An interrupt stays an interrupt: a shielded block that fails after a signal arrived raises
`Interrupted` (its `__cause__` is the block's own failure), and the remembered signal is cleared
when the outermost shielded block ends, whichever way it ends, so it never fires in a later one."""

from __future__ import annotations

import contextlib
import logging
import signal

from kvm_borg.errors import Interrupted

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_state: dict = {"shielded": 0, "pending": None}


def _handler(signum, _frame):
    if _state["shielded"]:
        if _state["pending"] is None:
            log.warning("signal %d received: finishing the merge of the overlays first", signum)
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def pending() -> int | None:
    """Return the signal remembered by the current shielded block (None if none)."""
    return _state["pending"]


@contextlib.contextmanager
def interruptible():
    """Within this block, SIGTERM/SIGINT/SIGHUP raise Interrupted in the main thread."""
    previous = {sig: signal.signal(sig, _handler) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _leave_shield() -> int | None:
    """Leave one shielded level; when it was the outermost, clear and return the remembered signal."""
    _state["shielded"] -= 1
    if _state["shielded"]:
        return None
    signum, _state["pending"] = _state["pending"], None
    return signum


@contextlib.contextmanager
def shielded():
    """Within this block, signals are remembered, not raised. When the outermost block ends the
    remembered signal is cleared and raised as Interrupted: after a normal end, and also when the
    block raised something else (the interrupt wins; the block's exception becomes its __cause__)."""
    _state["shielded"] += 1
    try:
        yield
    except BaseException as exc:
        signum = _leave_shield()
        if signum is not None and not isinstance(exc, Interrupted):
            raise Interrupted(signum) from exc
        raise
    signum = _leave_shield()
    if signum is not None:
        raise Interrupted(signum)
