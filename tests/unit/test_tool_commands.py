"""The pure parts of `kvm-borg key export` and `kvm-borg borg|restic -- ARGS`: which repository, which
argv, which environment, which signals are passed on, where the key file goes."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from kvm_borg.actions.key import check_destination, check_export, refuse_restic, write_private_file
from kvm_borg.backends.borg.environment import make_environment
from kvm_borg.backends.ssh_options import with_default_options
from kvm_borg.backends.tool_commands import (
    borg_passthrough_environment,
    choose_repository,
    make_borg_key_export_command,
    make_borg_passthrough_command,
    make_restic_passthrough_command,
    strip_separator,
)
from kvm_borg.errors import UsageError
from kvm_borg.execute import attached_signal_map, exit_status

BORG_A = {"name": "a", "type": "borg", "path": "/srv/a", "passphrase_file": "/etc/kvm-borg/a"}
BORG_B = {"name": "b", "type": "borg", "path": "ssh://u@h:22/./b", "passphrase_command": "pass show b"}
RESTIC_R = {"name": "r", "type": "restic", "url": "sftp:u@h:/r", "passphrase_file": "/etc/kvm-borg/r"}


# --- which repository -------------------------------------------------------------------------


def test_the_only_repository_of_the_type_is_taken_without_repo():
    assert choose_repository([BORG_A, RESTIC_R], None, "borg", "kvm-borg borg") is BORG_A
    assert choose_repository([BORG_A, RESTIC_R], None, "restic", "kvm-borg restic") is RESTIC_R


def test_several_repositories_of_the_type_without_repo_are_refused_with_their_names():
    with pytest.raises(UsageError, match=r"several borg repositories .* --repo: a, b$"):
        choose_repository([BORG_A, BORG_B, RESTIC_R], None, "borg", "key export")


def test_a_named_repository_is_taken():
    assert choose_repository([BORG_A, BORG_B], "b", "borg", "kvm-borg borg") is BORG_B


def test_an_unknown_repository_is_refused_with_the_configured_names():
    with pytest.raises(UsageError, match=r"--repo zz: no such repository \(configured: a, r\)"):
        choose_repository([BORG_A, RESTIC_R], "zz", "borg", "kvm-borg borg")


def test_a_repository_of_the_other_type_is_refused_with_the_command_to_use():
    with pytest.raises(UsageError, match=r"needs a borg repository, r is a restic one; use `kvm-borg restic --repo r"):
        choose_repository([BORG_A, RESTIC_R], "r", "borg", "kvm-borg borg")
    with pytest.raises(UsageError, match=r"needs a restic repository, a is a borg one; use `kvm-borg borg --repo a"):
        choose_repository([BORG_A, RESTIC_R], "a", "restic", "kvm-borg restic")


def test_no_repository_of_the_type_is_refused():
    with pytest.raises(UsageError, match=r"no restic repository is configured \(configured: a \(borg\)\)"):
        choose_repository([BORG_A], None, "restic", "kvm-borg restic")


def test_restic_key_export_says_there_is_no_key_file():
    with pytest.raises(UsageError, match=r"restic has no key file to export .* \(/etc/kvm-borg/r\)"):
        refuse_restic([BORG_A, RESTIC_R], "r")
    with pytest.raises(UsageError, match=r"restic has no key file"):
        refuse_restic([RESTIC_R], None)
    refuse_restic([BORG_A, RESTIC_R], None)  # a borg repository to export from: no refusal
    refuse_restic([BORG_A, RESTIC_R], "a")


# --- argv -------------------------------------------------------------------------------------


def test_separator_is_stripped_once():
    assert strip_separator(["--", "list", "--", "x"]) == ("list", "--", "x")
    assert strip_separator(["list"]) == ("list",)
    assert strip_separator([]) == ()


def test_borg_passthrough_puts_lock_wait_after_the_command():
    assert make_borg_passthrough_command("borg", ["list", "::a"], 60) == ("borg", "list", "--lock-wait", "60", "::a")
    assert make_borg_passthrough_command("borg", ["key", "export", "--paper"], 5) == (
        "borg", "key", "export", "--lock-wait", "5", "--paper")


def test_borg_passthrough_adds_nothing_to_repositoryless_calls():
    assert make_borg_passthrough_command("borg", ["--version"], 60) == ("borg", "--version")
    assert make_borg_passthrough_command("borg", ["help", "patterns"], 60) == ("borg", "help", "patterns")
    assert make_borg_passthrough_command("borg", ["list"], None) == ("borg", "list")


def test_borg_key_export_prints_to_stdout():
    assert make_borg_key_export_command("/v/borg", "/srv/{x}", paper=True, lock_wait=60) == (
        "/v/borg", "key", "export", "--log-json", "--lock-wait", "60", "--paper", "/srv/{{x}}", "-")
    assert make_borg_key_export_command("borg", "/srv/a", paper=False, lock_wait=None) == (
        "borg", "key", "export", "--log-json", "/srv/a", "-")


def test_restic_passthrough_passes_the_sftp_command_as_an_option():
    assert make_restic_passthrough_command("restic", ["snapshots", "--json"], ["sftp.command=ssh -p 2 u@h -s sftp"]) == (
        "restic", "--option", "sftp.command=ssh -p 2 u@h -s sftp", "snapshots", "--json")
    assert make_restic_passthrough_command("restic", ["snapshots"], ()) == ("restic", "snapshots")


# --- environment ------------------------------------------------------------------------------


def test_borg_passthrough_environment_names_the_repository_and_keeps_the_secret_out():
    inherited = {"PATH": "/usr/bin", "BORG_PASSPHRASE": "leaked", "BORG_REPO": "/elsewhere",
                 "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "YES"}
    env = borg_passthrough_environment(make_environment(BORG_B, inherited), "ssh://u@h:22/./{b}", inherited)
    assert env["BORG_REPO"] == "ssh://u@h:22/./{{b}}"  # borg expands placeholders in BORG_REPO
    assert "BORG_PASSPHRASE" not in env
    assert env["BORG_PASSCOMMAND"] == "pass show b"
    assert env["BORG_RSH"] == with_default_options("ssh -o BatchMode=yes")  # as the backend's own runs
    assert env["BORG_DELETE_I_KNOW_WHAT_I_AM_DOING"] == "YES"  # the user's own answer
    assert "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING" not in env  # borg asks, as when run by hand
    assert "TZ" not in env and "BORG_EXIT_CODES" not in env
    assert env["BORG_DISPLAY_PASSPHRASE"] == "no"


def test_borg_passthrough_environment_keeps_configured_ssh_settings():
    repo = dict(BORG_A, ssh_command="ssh -i /k", remote_path="borg-1.4")
    env = borg_passthrough_environment(make_environment(repo, {}), repo["path"], {})
    assert env["BORG_RSH"] == with_default_options("ssh -i /k") and env["BORG_REMOTE_PATH"] == "borg-1.4"
    assert "BORG_PASSCOMMAND" not in env  # a passphrase_file goes through BORG_PASSPHRASE_FD at run time


# --- signals and exit codes -------------------------------------------------------------------


def test_a_terminal_ctrl_c_is_not_sent_twice():
    assert attached_signal_map(signal.SIGTERM, True)[signal.SIGINT] is None
    assert attached_signal_map(signal.SIGTERM, False)[signal.SIGINT] == signal.SIGINT


def test_termination_is_passed_on_as_the_stop_signal():
    forward = attached_signal_map(signal.SIGINT, True)
    assert forward[signal.SIGTERM] == signal.SIGINT and forward[signal.SIGHUP] == signal.SIGINT


def test_exit_status_is_the_shells():
    assert exit_status(0) == 0 and exit_status(2) == 2 and exit_status(-signal.SIGTERM) == 143


# --- the key file -----------------------------------------------------------------------------


def test_key_destination_refuses_existing_files_and_directories(tmp_path):
    existing = tmp_path / "k"
    existing.write_text("x")
    with pytest.raises(UsageError, match="exists: choose another file, or use --overwrite"):
        check_destination(str(existing), overwrite=False)
    assert check_destination(str(existing), overwrite=True) == existing
    with pytest.raises(UsageError, match="is a directory"):
        check_destination(str(tmp_path), overwrite=True)
    with pytest.raises(UsageError, match="does not exist"):
        check_destination(str(tmp_path / "missing" / "k"), overwrite=False)
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="exists"):
        check_destination(str(dangling), overwrite=False)
    assert check_destination("-", overwrite=False) is None


def test_key_file_is_written_0600_and_never_clobbered(tmp_path):
    old_umask = os.umask(0)
    try:
        path = tmp_path / "key"
        write_private_file(path, b"BORG_KEY 1\n", overwrite=False)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"BORG_KEY 1\n"
    with pytest.raises(UsageError, match="exists"):
        write_private_file(path, b"BORG_KEY 2\n", overwrite=False)
    assert path.read_bytes() == b"BORG_KEY 1\n"
    path.chmod(0o644)
    write_private_file(path, b"BORG_KEY 3\n", overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"BORG_KEY 3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # no temporary file left


def test_an_export_that_is_no_key_is_an_error():
    check_export("BORG_KEY 00ff\nabc\n", paper=False)
    check_export("To restore key use borg key import --paper /path/to/repo\n\nBORG PAPER KEY v1\n", paper=True)
    with pytest.raises(Exception, match="printed no key file"):
        check_export("", paper=False)
    with pytest.raises(Exception, match="printed no paper key"):
        check_export("BORG_KEY 00ff\n", paper=True)
