"""The keepalive and connect-timeout options added to every ssh borg and restic start: no ssh run."""

from __future__ import annotations

import shlex

import pytest

from kvm_borg.backends.borg.environment import make_environment
from kvm_borg.backends.restic import commands as rc
from kvm_borg.backends.ssh_options import options_set, with_default_options

DEFAULTS = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "ConnectTimeout=30"]


def test_defaults_go_right_after_ssh():
    assert shlex.split(with_default_options("ssh -o BatchMode=yes")) == ["ssh", *DEFAULTS, "-o", "BatchMode=yes"]
    assert shlex.split(with_default_options("/usr/bin/ssh")) == ["/usr/bin/ssh", *DEFAULTS]


@pytest.mark.parametrize("command, kept", [
    ("ssh -o ServerAliveInterval=60", "ServerAliveInterval=60"),
    ("ssh -oserveraliveinterval=60", "-oserveraliveinterval=60"),
    ("ssh -o 'ServerAliveInterval 60'", "ServerAliveInterval 60"),
])
def test_an_option_the_user_sets_is_left_alone(command, kept):
    argv = shlex.split(with_default_options(command))
    assert kept in argv
    assert "ServerAliveInterval=15" not in argv
    assert "ServerAliveCountMax=4" in argv and "ConnectTimeout=30" in argv


def test_a_command_setting_every_option_is_unchanged():
    command = "ssh -o ServerAliveInterval=5 -o ServerAliveCountMax=2 -o ConnectTimeout=10 -i '/k ey'"
    assert with_default_options(command) == command


def test_a_wrapper_keeps_its_own_arguments_first():
    argv = shlex.split(with_default_options("sshpass -f /etc/pw ssh -p 2222"))
    assert argv == ["sshpass", "-f", "/etc/pw", "ssh", *DEFAULTS, "-p", "2222"]


def test_a_command_without_ssh_or_with_unbalanced_quotes_is_unchanged():
    assert with_default_options("my-tunnel --fast") == "my-tunnel --fast"
    assert with_default_options("ssh -i '/k") == "ssh -i '/k"


def test_options_set_reads_every_form():
    assert options_set(["-o", "A=1", "-oB=2", "-o", "C 3", "-p", "22", "-o"]) == {"a", "b", "c"}


def test_borg_rsh_has_the_defaults_and_keeps_the_users_options():
    env = make_environment({"ssh_command": "ssh -i /k -o ConnectTimeout=5"}, {})
    argv = shlex.split(env["BORG_RSH"])
    assert argv[:5] == ["ssh", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    assert "ConnectTimeout=5" in argv and "ConnectTimeout=30" not in argv
    assert shlex.split(make_environment({}, {})["BORG_RSH"]) == ["ssh", *DEFAULTS, "-o", "BatchMode=yes"]


def test_restic_sftp_command_has_the_defaults():
    from kvm_borg.backends.restic.repository import ResticRepository

    settings = type("S", (), {"hostname": "hv1", "restic_binary": None, "progress": False})()
    backend = ResticRepository({"name": "r", "type": "restic", "url": "sftp://u@127.0.0.1:2222//r",
                                "ssh_command": "ssh -i /k"}, settings)
    option = backend.options[0]
    assert option.startswith("sftp.command=")
    argv = shlex.split(option[len("sftp.command="):])
    assert argv[:3] == ["ssh", "-o", "BatchMode=yes"]  # still first: nothing can make ssh prompt
    for name in ("ServerAliveInterval=15", "ServerAliveCountMax=4", "ConnectTimeout=30"):
        assert argv[argv.index(name) - 1] == "-o"
    assert argv[-5:] == ["-p", "2222", "u@127.0.0.1", "-s", "sftp"]
    assert rc.sftp_command("rest:http://127.0.0.1:1/", with_default_options("ssh")) is None
