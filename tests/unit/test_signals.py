"""Signals: an interrupt stays an interrupt, even when the shielded merge fails, and a signal
remembered during one shielded block never fires in a later one."""

import os
import signal

import pytest

from kvm_borg import signals
from kvm_borg.errors import CommitError, Interrupted


def _send_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before os.kill returns (main thread)


def test_signal_outside_a_shield_raises_interrupted():
    with signals.interruptible():
        with pytest.raises(Interrupted) as info:
            _send_sigterm()
    assert info.value.signum == signal.SIGTERM


def test_signal_inside_a_shield_waits_for_its_end():
    reached_end = False
    with signals.interruptible():
        with pytest.raises(Interrupted):
            with signals.shielded():
                _send_sigterm()
                assert signals.pending() == signal.SIGTERM
                reached_end = True
    assert reached_end and signals.pending() is None


def test_interrupt_wins_over_a_failure_of_the_shielded_block():
    with signals.interruptible():
        with pytest.raises(Interrupted) as info:
            with signals.shielded():
                _send_sigterm()
                raise CommitError("could not merge overlays back; run `kvm-borg recover 'vm'`")
    assert info.value.signum == signal.SIGTERM
    assert isinstance(info.value.__cause__, CommitError)  # the merge's message is kept for the report


def test_signal_remembered_during_a_failed_block_is_cleared_and_never_fires_in_a_later_one():
    with signals.interruptible():
        with pytest.raises(Interrupted):
            with signals.shielded():
                _send_sigterm()
                raise CommitError("merge failed")
        assert signals.pending() is None
        with signals.shielded():  # a later merge (next domain, recover) ends normally
            pass


def test_failure_without_a_signal_propagates_unchanged():
    with signals.interruptible():
        with pytest.raises(CommitError):
            with signals.shielded():
                raise CommitError("merge failed")
    assert signals.pending() is None


def test_nested_shields_raise_only_at_the_outermost_end():
    inner_done = False
    with signals.interruptible():
        with pytest.raises(Interrupted):
            with signals.shielded():
                with signals.shielded():
                    _send_sigterm()
                inner_done = True  # the inner block's end did not raise
    assert inner_done and signals.pending() is None
