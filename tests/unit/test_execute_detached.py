"""execute.start_detached: a child meant to outlive kvm-borg (restic's FUSE server of `kvm-borg mount`)."""

from __future__ import annotations

import os
import sys

import pytest

from kvm_borg.execute import CommandError, start_detached


def test_a_detached_child_runs_in_its_own_session_writing_to_the_given_file(tmp_path):
    log = tmp_path / "out.log"
    script = "import os, sys; print('out', os.getsid(0) == os.getpid()); print('err', file=sys.stderr)"
    with open(log, "wb") as output:
        process = start_detached([sys.executable, "-c", script], env={"PATH": os.environ["PATH"]}, output=output)
    assert process.wait(timeout=30) == 0
    assert sorted(log.read_text().splitlines()) == ["err", "out True"]


def test_a_detached_child_gets_no_parent_death_wrapper_and_no_terminal_input(tmp_path):
    # run_command wraps its children in `setpriv --pdeathsig`; a server kvm-borg leaves running must not
    # be stopped when kvm-borg exits, so its argv is run as given.
    argv = [sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"]
    with open(tmp_path / "out.log", "wb") as output:
        process = start_detached(argv, env={}, output=output)
    assert list(process.args) == argv
    assert process.wait(timeout=30) == 0
    assert (tmp_path / "out.log").read_text().strip() == "''"  # stdin is /dev/null


def test_a_command_that_cannot_start_is_a_command_error(tmp_path):
    with open(tmp_path / "out.log", "wb") as output, pytest.raises(CommandError) as caught:
        start_detached([str(tmp_path / "no-such-binary")], env={}, output=output)
    assert caught.value.returncode is None and "cannot run" in caught.value.message
