"""A private OpenSSH server on loopback for tests of remote repositories (borg over ssh, restic over sftp).

Each server has its own directory (config, host key, authorized_keys, log), its own port on
127.0.0.1, and lets in one dedicated unprivileged user (``kbtest-backup``, created once per
machine) by public key only. It is never the system's sshd::

    server = start_sshd(directory)
    key = generate_key(directory / "client")            # the hypervisor's key pair
    server.authorize(key, command=f"{BORG_BIN} serve --restrict-to-path {repo} --append-only")
    repo = server.make_repo_dir(directory / "srv" / "hv1")
    config = {"path": server.borg_url(repo), "ssh_command": server.ssh_command(key)}
    ...
    server.stop()

``ssh_command`` never prompts (BatchMode, a known_hosts file holding only this server's key,
StrictHostKeyChecking=yes).
"""

from __future__ import annotations

import functools
import os
import pwd
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvm_borg.engine.qemu_nbd import stop as stop_process  # SIGTERM, SIGKILL if it lingers, reaped

from .runs import TEST_ROOT, make_dir

SSHD_BIN = Path("/usr/sbin/sshd")
SSH_USER = "kbtest-backup"
SSH_HOME = TEST_ROOT / "ssh-home"
PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd refuses to start without it


def ensure_user(name: str = SSH_USER, home: Path = SSH_HOME) -> pwd.struct_passwd:
    """Create the dedicated server-side user (no password, not locked, /bin/sh) unless it exists; return it."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        make_dir(home.parent)
        proc = subprocess.run(
            ["useradd", "--system", "--home-dir", str(home), "--shell", "/bin/sh", "--password", "*", name],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        if proc.returncode not in (0, 9):  # 9: created meanwhile by another test run
            raise RuntimeError(f"useradd {name} failed: {proc.stderr.strip()}")
        entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    if not home.is_dir():
        make_dir(home)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return entry


def generate_key(path: Path, comment: str = "kbtest") -> Path:
    """Create an ed25519 key pair without passphrase at `path` (+ `.pub`); return the private key's path."""
    path = Path(path)
    make_dir(path.parent, 0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SshServer:
    """A running private sshd: where it listens, whom it lets in, and how a client reaches it."""

    directory: Path
    port: int
    user: str
    process: subprocess.Popen
    known_hosts: Path
    authorized_keys: Path
    log_path: Path
    _lines: list[str] = field(default_factory=list)

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    def authorize(self, private_key: Path, *, command: str | None = None, restrict: bool = True) -> None:
        """Let `private_key`'s public half in, optionally forced to `command` (authorized_keys `command=`)."""
        options = []
        if command is not None:
            options.append('command="' + command.replace("\\", "\\\\").replace('"', '\\"') + '"')
        if restrict:
            options.append("restrict")
        public = Path(str(private_key) + ".pub").read_text().strip()
        self._lines.append((",".join(options) + " " if options else "") + public)
        self.authorized_keys.write_text("\n".join(self._lines) + "\n")
        os.chmod(self.authorized_keys, 0o644)

    def ssh_command(self, private_key: Path, *, connect_timeout: int = 10) -> str:
        """Return the ssh command a client uses: this key only, this server's host key only, never a prompt."""
        return shlex.join([
            "ssh", "-i", str(private_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"ConnectTimeout={connect_timeout}",
            "-F", "/dev/null",
        ])

    def borg_url(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{Path(path)}"

    def sftp_url(self, path: Path) -> str:
        return f"sftp://{self.user}@127.0.0.1:{self.port}/{Path(path)}"  # "//abs" = absolute path

    def make_repo_dir(self, path: Path) -> Path:
        """Create a directory (and QEMU-irrelevant parents, 0755) that the server user owns; return it."""
        path = Path(path)
        make_dir(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
        entry = pwd.getpwnam(self.user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        return path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.process)


SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
PidFile {directory}/sshd.pid
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


def start_sshd(directory: Path, user: str = SSH_USER, timeout: float = 20) -> SshServer:
    """Start a private sshd on a free loopback port with its own host key and config in `directory`; return it once it listens."""
    ensure_user(user)
    directory = make_dir(Path(directory))
    make_dir(PRIVSEP_DIR)
    host_key = directory / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True,
                   capture_output=True, stdin=subprocess.DEVNULL)
    authorized_keys = directory / "authorized_keys"
    authorized_keys.write_text("")
    os.chmod(authorized_keys, 0o644)
    log_path = directory / "sshd.log"
    for _attempt in range(5):
        port = free_port()
        config = directory / "sshd_config"
        config.write_text(SSHD_CONFIG.format(port=port, host_key=host_key, directory=directory,
                                             authorized_keys=authorized_keys, user=user))
        with open(log_path, "ab") as log:
            process = subprocess.Popen([str(SSHD_BIN), "-D", "-e", "-f", str(config), "-p", str(port)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if _wait_listening(process, port, timeout):
            break
        process.kill()
        process.wait()
    else:
        raise RuntimeError(f"sshd did not start; its log:\n{log_path.read_text(errors='replace')}")
    known_hosts = directory / "known_hosts"
    host_public = (directory / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
    return SshServer(directory, port, user, process, known_hosts, authorized_keys, log_path)


def _wait_listening(process: subprocess.Popen, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.settimeout(2)
                if sock.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


@functools.lru_cache(maxsize=None)
def server_borg(user: str = SSH_USER) -> str:
    """Return a shell command that runs the tests' borg as `user` (for authorized_keys `command=`).

    The venv's borg when `user` can run it; else the venv's packages under the system python of
    the same version (a venv whose interpreter lives under /root is out of a plain user's reach)."""
    import sys
    import sysconfig

    from .cli import BORG_BIN

    site = sysconfig.get_paths()["purelib"]
    system_python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [shlex.quote(str(BORG_BIN)), f"env PYTHONPATH={shlex.quote(site)} {system_python} -m borg"]
    for candidate in candidates:
        proc = subprocess.run(["runuser", "-u", user, "--", "sh", "-c", f"cd / && {candidate} --version"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode == 0:
            return candidate
    raise RuntimeError(f"no borg runs as {user}: tried {candidates}")
