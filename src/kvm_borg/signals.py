"""Signal handling: SIGTERM/SIGINT/SIGHUP become an `Interrupted` exception so every `finally`
runs, except inside `shielded()` blocks (merging overlays back), where they wait until the end.

An interrupt stays an interrupt: a shielded block that fails after a signal arrived raises
`Interrupted` (its `__cause__` is the block's own failure), and the remembered signal is cleared
when the outermost shielded block ends, whichever way it ends, so it never fires in a later one.

Only the main thread receives signals. A parallel run (`backup --jobs N`) backs domains up in worker
threads while the main thread waits: there `shielded()` changes nothing (no signal can reach a worker
thread), and the main thread, interrupted, calls `request_stop(signum)`; each worker then raises
Interrupted at its next `check_stop()` (before planning, after the freeze, before and after the
store, before a second attempt), so its own `finally` merges its domain back as in a sequential run."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from kvm_borg.errors import Interrupted

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_state: dict = {"shielded": 0, "pending": None, "stop": None}


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


def request_stop(signum: int) -> None:
    """Given the signal that interrupted a parallel run's main thread, make every later `check_stop()`
    (in any thread) raise Interrupted(signum) until `clear_stop()`."""
    _state["stop"] = signum


def clear_stop() -> None:
    """End what `request_stop` asked (the parallel run has ended)."""
    _state["stop"] = None


def stop_requested() -> int | None:
    """Return the signal a parallel run was interrupted by (None: not interrupted)."""
    return _state["stop"]


def check_stop() -> None:
    """Raise Interrupted if a parallel run was asked to stop (`request_stop`); otherwise return at once."""
    signum = _state["stop"]
    if signum is not None:
        raise Interrupted(signum)


@contextlib.contextmanager
def shielded():
    """Within this block, signals are remembered, not raised. When the outermost block ends the
    remembered signal is cleared and raised as Interrupted: after a normal end, and also when the
    block raised something else (the interrupt wins; the block's exception becomes its __cause__).
    In a thread other than the main one (which alone receives signals) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
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
