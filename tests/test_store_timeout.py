"""Bounded overlay lifetime: a repository that hangs (a port on 127.0.0.1 that accepts and never
answers) is given up after `store_timeout`, and the domain is merged back; every ssh borg or
restic starts carries kvm-borg's keepalive and connect-timeout options.

Real borg, real restic, real ssh, a real running domain; only the server is a silent socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import KVM_BORG_BIN, DiskSpec
from harness.cli import _merged_env
from silent_server import SilentServer
from support import assert_back_on_own_images, cli_env, write_config, write_passphrase

DISKS = [DiskSpec("vda", "qcow2", 32), DiskSpec("vdb", "raw", 32)]
SSH_DEFAULTS = ("ServerAliveInterval=15", "ServerAliveCountMax=4", "ConnectTimeout=30")
# The user's ssh_command in these tests: never prompt, no host key to trust (nothing ever answers).
SSH_COMMAND = "ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def ssh_processes_to(port: int) -> dict[int, list[str]]:
    """Return {pid: argv} of every running ssh whose argv connects to `port` (`-p PORT`)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == "ssh" and any(
                argv[i] == "-p" and argv[i + 1] == str(port) for i in range(len(argv) - 1)):
            found[int(pid)] = argv
    return found


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 120):
    """Poll `predicate` until it returns something truthy (returned); bounded, and fails if `proc` ended first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"kvm-borg exited {proc.returncode} before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def start_backup(config: Path, domain) -> subprocess.Popen:
    return subprocess.Popen([str(KVM_BORG_BIN), "--config", str(config), "backup", domain.name, "--json"],
                            env=_merged_env(cli_env()), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_gone(pids, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in pids):
        assert time.monotonic() < deadline, f"{what} still running"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def run_against_silent_repository(domain, config: Path, port: int) -> tuple[dict[int, list[str]], int, dict, str]:
    """Back up `domain` into the silent repository; return (ssh children seen, exit code, JSON result, stderr).

    While kvm-borg waits on the server the domain must be on its overlays and the ssh child
    visible; after store_timeout kvm-borg must end on its own, the ssh children with it."""
    proc = start_backup(config, domain)
    try:
        ssh = wait_for(lambda: ssh_processes_to(port), "the ssh child to connect", proc)
        assert all(".kvm-borg-" in source for source in domain.live_sources().values())  # on its overlays
        out, err = proc.communicate(timeout=180)  # bounded: store_timeout is 5 s, the grace 5 s more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert_gone(ssh, "the ssh child of the stopped repository write")
    return ssh, proc.returncode, json.loads(out), err


def assert_ssh_defaults(argv: list[str]) -> None:
    for option in SSH_DEFAULTS:
        assert option in argv and argv[argv.index(option) - 1] == "-o", argv


def test_hanging_borg_repository_is_given_up_after_store_timeout_and_merged_back(domain_factory, image_dir,
                                                                                 tmp_path, silent_server):
    domain = domain_factory.make(disks=DISKS)
    config = write_config(image_dir / "kb", init=False, store_timeout="5s", repositories=[{
        "name": "silent", "type": "borg", "path": f"ssh://nobody@127.0.0.1:{silent_server.port}/srv/repo",
        "passphrase_file": str(write_passphrase(tmp_path / "pass")), "ssh_command": SSH_COMMAND}])
    ssh, rc, result, err = run_against_silent_repository(domain, config, silent_server.port)
    # The ssh borg started (BORG_RSH) carries the defaults and the user's own options.
    for argv in ssh.values():
        assert_ssh_defaults(argv)
        assert "StrictHostKeyChecking=no" in argv
    assert rc == 2, err
    store = result["domains"][0]["stores"][0]
    assert not result["domains"][0]["ok"] and not store["ok"]
    assert store["error"].startswith("store_timeout 5s passed"), store["error"]
    assert "store_timeout 5s passed" in err
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_hanging_restic_sftp_repository_is_given_up_after_store_timeout_and_merged_back(
        domain_factory, image_dir, tmp_path, silent_server):
    domain = domain_factory.make(disks=DISKS)
    config = write_config(image_dir / "kb", init=False, store_timeout="5s", repositories=[{
        "name": "silent", "type": "restic", "url": f"sftp://nobody@127.0.0.1:{silent_server.port}//srv/restic",
        "passphrase_file": str(write_passphrase(tmp_path / "pass")), "ssh_command": SSH_COMMAND}])
    ssh, rc, result, err = run_against_silent_repository(domain, config, silent_server.port)
    # restic's sftp.command, built by kvm-borg: BatchMode first, the defaults, the user's options.
    for argv in ssh.values():
        assert argv[1:3] == ["-o", "BatchMode=yes"], argv
        assert_ssh_defaults(argv)
    assert rc == 2, err
    store = result["domains"][0]["stores"][0]
    assert not store["ok"] and store["error"].startswith("store_timeout 5s passed"), store["error"]
    assert_back_on_own_images(domain, image_dir / "kb" / "state")


def test_ssh_options_the_user_sets_reach_ssh_instead_of_the_defaults(domain_factory, image_dir, tmp_path,
                                                                      silent_server):
    domain = domain_factory.make(disks=DISKS[:1])
    config = write_config(image_dir / "kb", init=False, store_timeout="5s", repositories=[{
        "name": "silent", "type": "borg", "path": f"ssh://nobody@127.0.0.1:{silent_server.port}/srv/repo",
        "passphrase_file": str(write_passphrase(tmp_path / "pass")),
        "ssh_command": SSH_COMMAND + " -o ServerAliveInterval=7"}])
    ssh, rc, _result, err = run_against_silent_repository(domain, config, silent_server.port)
    for argv in ssh.values():
        assert "ServerAliveInterval=7" in argv and "ServerAliveInterval=15" not in argv, argv
        assert "ConnectTimeout=30" in argv and "ServerAliveCountMax=4" in argv
    assert rc == 2, err
    assert_back_on_own_images(domain, image_dir / "kb" / "state")
