"""Running the kvm-borg CLI and the borg/restic CLIs from tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

VENV_BIN = Path(sys.executable).parent
KVM_BORG_BIN = VENV_BIN / "kvm-borg"
BORG_BIN = VENV_BIN / "borg"

#: Passphrase for test repositories only.
TEST_PASSPHRASE = "kbtest-passphrase-not-secret"

#: A directory put first on the PYTHONPATH of the programs the tests start (kvm-borg, borg), in which
#: `import pytest` fails, as it does in a production venv. This venv has pytest beside borg, and borg's
#: start-up (its self-test imports borg.testsuite) imports pytest when it can: ~0.25 s of CPU at every
#: borg start, only here. Nothing kvm-borg or borg runs uses pytest.
PRODUCTION_PATH = Path(__file__).resolve().parent / "production_path"


def with_production_path(env: Mapping[str, str]) -> dict[str, str]:
    """Given a child's environment, return it with PRODUCTION_PATH first on its PYTHONPATH."""
    paths = [str(PRODUCTION_PATH)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                      if p and p != str(PRODUCTION_PATH)]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    # Make the venv's tools (borg) win over anything else on PATH.
    merged["PATH"] = f"{VENV_BIN}{os.pathsep}{merged.get('PATH', '')}"
    if env:
        merged.update({k: str(v) for k, v in env.items()})
    return with_production_path(merged)


def _cli_argv(args, config) -> list[str]:
    """Given CLI arguments and an optional config path, return the argv of the venv's kvm-borg."""
    if not KVM_BORG_BIN.exists():
        raise FileNotFoundError(f"{KVM_BORG_BIN} not found: run 'sudo bash scripts/setup.sh --dev'")
    return [str(KVM_BORG_BIN), *(["--config", str(config)] if config is not None else []), *map(str, args)]


def start_cli(*args: str | os.PathLike, config: str | os.PathLike | None = None,
              env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start ``kvm-borg [--config CONFIG] ARGS...`` without waiting (for a test that acts while it runs).

    ``env`` is added to the current environment, stdin is /dev/null, stdout/stderr are text pipes:
    read them with ``proc.communicate()``. Return the Popen."""
    return subprocess.Popen(_cli_argv(args, config), env=_merged_env(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(*args: str | os.PathLike, config: str | os.PathLike | None = None,
            env: Mapping[str, str] | None = None, timeout: float = 600, check: bool = False,
            input: str | None = None, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``kvm-borg [--config CONFIG] ARGS...`` (the venv's console script).

    Returns the CompletedProcess (text stdout/stderr).  ``env`` is added to the
    current environment.  With ``check`` a non-zero exit raises AssertionError that
    shows the output.  The output is also printed so pytest shows it on failure.
    """
    cmd = _cli_argv(args, config)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_merged_env(env), timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL, cwd=cwd)
    print(f"$ {' '.join(cmd)}  -> exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def borg_env(passphrase: str = TEST_PASSPHRASE, base_dir: str | os.PathLike | None = None,
             extra: Mapping[str, str] | None = None, inherit: bool = True) -> dict[str, str]:
    """Environment for the borg CLI: BORG_PASSPHRASE, non-interactive answers, the
    venv's bin dir first on PATH and ``BORG_BIN`` (path of the venv's borg).

    ``base_dir`` isolates borg's config/cache/security dirs (BORG_BASE_DIR) from
    the real ones in ~ (recommended for tests).  With ``inherit=False`` only the
    borg-related variables (plus PATH/HOME/LANG) are returned.  BORG_FUSE_IMPL is
    "none", as kvm-borg gives its own borg runs (a test that runs ``borg mount``
    itself passes ``extra={"BORG_FUSE_IMPL": "pyfuse3"}``).
    """
    env = dict(os.environ) if inherit else {k: os.environ[k] for k in ("HOME", "LANG", "LC_ALL") if k in os.environ}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    env.update(
        BORG_PASSPHRASE=passphrase,
        BORG_BIN=str(BORG_BIN),
        BORG_DISPLAY_PASSPHRASE="no",
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_DELETE_I_KNOW_WHAT_I_AM_DOING="YES",
        BORG_CHECK_I_KNOW_WHAT_I_AM_DOING="YES",
        BORG_FUSE_IMPL="none",
    )
    env.pop("BORG_PASSCOMMAND", None)
    env.pop("BORG_PASSPHRASE_FD", None)
    if base_dir is not None:
        env["BORG_BASE_DIR"] = str(base_dir)
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return with_production_path(env)


def run_borg(*args: str | os.PathLike, env: Mapping[str, str] | None = None, timeout: float = 600,
             check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the venv's ``borg ARGS...`` with :func:`borg_env` (or ``env``)."""
    cmd = [str(BORG_BIN), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env) if env else borg_env(),
                          timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def start_borg(*args: str | os.PathLike, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start the venv's ``borg ARGS...`` with :func:`borg_env` (or ``env``) without waiting (a check
    that runs while the test does something else). stdin is /dev/null, stdout/stderr are text
    pipes: read them with ``proc.communicate()``. Return the Popen."""
    return subprocess.Popen([str(BORG_BIN), *map(str, args)], env=dict(env) if env else borg_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


RESTIC_BIN = Path(shutil.which("restic") or "/usr/bin/restic")


def restic_env(password: str = TEST_PASSPHRASE, cache_dir: str | os.PathLike | None = None,
               extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the restic CLI (RESTIC_PASSWORD, optional RESTIC_CACHE_DIR)."""
    env = dict(os.environ)
    env["RESTIC_PASSWORD"] = password
    env.pop("RESTIC_PASSWORD_FILE", None)
    env.pop("RESTIC_PASSWORD_COMMAND", None)
    if cache_dir is not None:
        env["RESTIC_CACHE_DIR"] = str(cache_dir)
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env
