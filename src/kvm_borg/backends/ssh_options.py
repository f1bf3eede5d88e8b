"""The ssh options kvm-borg adds to every ssh it has borg (BORG_RSH) or restic (sftp.command) start.

Without them a repository server that stops answering (a dead link, a hung NFS below it) keeps
ssh, and so the guest's overlay, waiting forever: no keepalive notices it and the connect has
only the system's TCP timeout. An option the user's `ssh_command` already sets is left alone.
"""

from __future__ import annotations

import os
import shlex

# The ssh of a repository without a configured ssh_command: never ask for a password or a host key, fail instead.
DEFAULT_SSH_COMMAND = "ssh -o BatchMode=yes"
# (option, value) added unless the ssh command sets the option: a dead server is noticed after
# ServerAliveInterval × ServerAliveCountMax = 60 s, a connect (and its handshake) gives up after 30 s.
DEFAULT_SSH_OPTIONS: tuple[tuple[str, str], ...] = (
    ("ServerAliveInterval", "15"),
    ("ServerAliveCountMax", "4"),
    ("ConnectTimeout", "30"),
)


def options_set(argv: list[str]) -> set[str]:
    """Given an ssh argv, return the lower-cased names of the options its `-o` arguments set.

    Takes every form ssh accepts: `-o Name=value`, `-o "Name value"`, `-oName=value`."""
    names: set[str] = set()
    for index, arg in enumerate(argv):
        if arg == "-o" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("-o") and len(arg) > 2:
            value = arg[2:]
        else:
            continue
        name = value.replace("=", " ", 1).split(None, 1)
        if name:
            names.add(name[0].lower())
    return names


def with_default_options(ssh_command: str) -> str:
    """Given an ssh command line (e.g. "ssh -o BatchMode=yes -i key"), return it with
    `-o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o ConnectTimeout=30` inserted right after
    the ssh program, each only if the command does not set that option itself.

    The ssh program is the first word named `ssh` (so a wrapper like `sshpass -f FILE ssh ...`
    keeps working); a command without one, or one shlex cannot split (config validation reports
    that), is returned unchanged."""
    try:
        argv = shlex.split(ssh_command)
    except ValueError:
        return ssh_command
    program = next((i for i, word in enumerate(argv) if os.path.basename(word) == "ssh"), None)
    if program is None:
        return ssh_command
    present = options_set(argv[program + 1:])
    added: list[str] = []
    for name, value in DEFAULT_SSH_OPTIONS:
        if name.lower() not in present:
            added += ["-o", f"{name}={value}"]
    if not added:
        return ssh_command
    argv[program + 1:program + 1] = added
    return shlex.join(argv)
