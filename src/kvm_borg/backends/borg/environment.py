"""What a borg run gets besides its argv: which borg binary, and its environment. No borg runs here."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvm_borg.backends.ssh_options import DEFAULT_SSH_COMMAND, with_default_options

# Set for every borg run, whatever the caller's environment says: borg never prompts, never
# accepts a moved or unknown unencrypted repository, never deletes or repairs without asking,
# reports 0/1/2 exit codes and prints times in UTC.
FIXED_ENVIRONMENT = {
    "BORG_DISPLAY_PASSPHRASE": "no",
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "no",
    "BORG_CHECK_I_KNOW_WHAT_I_AM_DOING": "NO",
    "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "NO",
    "BORG_EXIT_CODES": "legacy",
    "TZ": "UTC",
}
# Inherited variables that would change which secret, repository or ssh borg uses.
DROPPED_ENVIRONMENT = frozenset(
    {
        "BORG_PASSPHRASE",
        "BORG_PASSCOMMAND",
        "BORG_PASSPHRASE_FD",
        "BORG_NEW_PASSPHRASE",
        "BORG_DEBUG_PASSPHRASE",
        "BORG_REPO",
        "BORG_RSH",
        "BORG_REMOTE_PATH",
        "BORG_FILES_CACHE_SUFFIX",
    }
)
# The variable that names the fd of the inherited pipe the passphrase_file's bytes come through.
PASSPHRASE_FD_VARIABLE = "BORG_PASSPHRASE_FD"
# Which FUSE library borg loads. It imports it at every start (pyfuse3 and trio: ~0.1 s of CPU), though
# only `borg mount` uses it; every other run gets "none".
FUSE_IMPL_VARIABLE = "BORG_FUSE_IMPL"


def find_borg_binary(configured: str | None) -> str:
    """Given the configured borg_binary (None: not set), return the borg to run.

    Unset means the borg installed beside the running interpreter (our own venv's), else the
    one on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).parent / "borg"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("borg") or "borg"


def files_cache_suffix(domain: str) -> str:
    """Given a domain name, return a BORG_FILES_CACHE_SUFFIX that is safe as a file name and unique to it.

    One files cache per domain: borg forgets files not seen in its last 20 runs of a cache, so a
    shared cache would forget every image of a repository that holds more than 20 domains."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", domain)[:80]
    if safe != domain:
        import hashlib  # only for such a name: `import hashlib` loads OpenSSL (~3 ms of a backup's start-up)

        safe += "-" + hashlib.sha256(domain.encode()).hexdigest()[:8]
    return f"kvm-borg-{safe}"


def make_environment(
    repository: Mapping[str, Any], inherited: Mapping[str, str], *, cache_suffix: str | None = None,
    fuse: bool = False,
) -> dict[str, str]:
    """Given a repository config, the inherited environment and whether the run mounts (`fuse`: `borg
    mount`, or a user's own borg command), return borg's environment (without `fuse`, BORG_FUSE_IMPL=none).

    It never holds a passphrase: a `passphrase_file` goes through BORG_PASSPHRASE_FD at run
    time; a `passphrase_command` is a command, so it goes into BORG_PASSCOMMAND. BORG_RSH is the
    ssh_command with kvm-borg's keepalive and connect-timeout defaults (`ssh_options`)."""
    env = {key: value for key, value in inherited.items() if key not in DROPPED_ENVIRONMENT}
    env.update(FIXED_ENVIRONMENT)
    env["BORG_RSH"] = with_default_options(repository.get("ssh_command") or DEFAULT_SSH_COMMAND)
    if repository.get("remote_path"):
        env["BORG_REMOTE_PATH"] = repository["remote_path"]
    if repository.get("passphrase_command"):
        env["BORG_PASSCOMMAND"] = repository["passphrase_command"]
    if cache_suffix:
        env["BORG_FILES_CACHE_SUFFIX"] = cache_suffix
    if not fuse:
        env[FUSE_IMPL_VARIABLE] = "none"
    return env
