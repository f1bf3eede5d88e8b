"""Signal handling: SIGTERM/SIGINT/SIGHUP become an `Interrupted` exception so every `finally`
runs, except inside `shielded()` blocks (merging overlays back), where they wait until the end."""

from __future__ import annotations

import contextlib
import logging
import signal

from kvm_borg.errors import Interrupted

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_state = {"shielded": 0, "pending": None}


def _handler(signum, _frame):
    if _state["shielded"]:
        if _state["pending"] is None:
            log.warning("signal %d received: finishing the merge of the overlays first", signum)
        _state["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible():
    """Within this block, SIGTERM/SIGINT/SIGHUP raise Interrupted in the main thread."""
    previous = {sig: signal.signal(sig, _handler) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def shielded():
    """Within this block, signals are remembered, not raised; the last one is raised at the end."""
    _state["shielded"] += 1
    try:
        yield
    finally:
        _state["shielded"] -= 1
    if not _state["shielded"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        raise Interrupted(signum)
