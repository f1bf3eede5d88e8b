"""scripts/setup.sh makes Debian's libnbd bindings (python3-libnbd) importable in the venv when its
Python has their ABI, says plainly when it cannot (the bitmap method is then unavailable), and can
be run again."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/lib/python3/dist-packages")
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")  # this interpreter's: the new venv's too


@pytest.fixture
def venv(tmp_path):
    """A fresh venv (no pip) made with the interpreter the tests run on."""
    path = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path


def _link(venv: Path, dist_packages: Path = DEBIAN) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVM_BORG_VENV": str(venv), "KVM_BORG_DIST_PACKAGES": str(dist_packages)}
    return subprocess.run(["bash", "-c", f"source {REPO / 'scripts/lib.sh'}; kb_link_libnbd"], env=env,
                          capture_output=True, text=True, timeout=120)


def _imports_nbd(venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin/python"), "-c", "import nbd; print(nbd.NBD().get_version())"],
                          capture_output=True, text=True)


def _purelib(venv: Path) -> Path:
    out = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_debians_libnbd_imports_in_the_venv_and_a_rerun_changes_nothing(venv):
    assert (DEBIAN / f"libnbdmod{SUFFIX}").exists(), "python3-libnbd (setup.sh installs it) is missing"
    assert _imports_nbd(venv).returncode != 0  # a plain venv cannot
    first = _link(venv)
    assert first.returncode == 0, first.stderr
    assert "importable in" in first.stdout and "the bitmap method can run" in first.stdout
    imported = _imports_nbd(venv)
    assert imported.returncode == 0 and imported.stdout.strip() == first.stdout.split("libnbd ")[1].split()[0]
    links = sorted(p.name for p in _purelib(venv).iterdir() if p.is_symlink())
    assert links == sorted(["nbd.py", f"libnbdmod{SUFFIX}"])
    again = _link(venv)
    assert again.returncode == 0 and again.stdout == first.stdout and again.stderr == ""
    assert _imports_nbd(venv).returncode == 0


def test_bindings_for_another_python_are_not_linked_and_say_why(venv, tmp_path):
    debian = tmp_path / "dist-packages"  # Debian's directory, first with the bindings for this Python
    debian.mkdir()
    for name in ("nbd.py", f"libnbdmod{SUFFIX}"):
        (debian / name).symlink_to(DEBIAN / name)
    assert _link(venv, debian).returncode == 0 and _imports_nbd(venv).returncode == 0
    (debian / f"libnbdmod{SUFFIX}").unlink()  # then, after an upgrade, built for another Python only
    (debian / "libnbdmod.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")
    proc = _link(venv, debian)
    assert proc.returncode == 0
    version = "%d.%d" % sys.version_info[:2]
    assert f"WARNING: the venv runs Python {version}, but Debian's python3-libnbd is built for Python 3.11" \
        in proc.stderr
    assert "libnbdmod.cpython-399-x86_64-linux-gnu.so" in proc.stderr and "the bitmap method is unavailable" in proc.stderr
    assert _imports_nbd(venv).returncode != 0  # the links to the old bindings are gone
    assert not any(p.is_symlink() for p in _purelib(venv).iterdir())


def test_without_python3_libnbd_the_warning_names_the_package(venv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _link(venv, empty)
    assert proc.returncode == 0
    assert f"WARNING: python3-libnbd is not installed ({empty}/nbd.py missing): the bitmap method is unavailable" \
        in proc.stderr
