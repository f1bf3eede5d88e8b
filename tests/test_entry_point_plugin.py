"""A plugin shipped as a package with an entry point in the `kvm_borg` group (README "Plugins",
docs/plugins.md) is found and used: a real wheel, installed by the venv's pip into a directory of
its own, contributes a config key through `kvm_borg_config_schema` that `kvm-borg config validate`
accepts only while that directory is on the import path."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness import run_cli

DIST = "kbtest_entry_plugin"
PLUGIN_SOURCE = '''"""Test plugin installed through an entry point: contributes one config key."""
from kvm_borg.hookspecs import hookimpl


@hookimpl
def kvm_borg_config_schema():
    return {"keys": {"kbtest_entry_key": {"type": "string", "description": "a key of the entry-point plugin"}}}
'''


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(directory: Path) -> Path:
    """Write a minimal, spec-conforming wheel of the test plugin (module + dist-info with an
    entry_points.txt) into `directory`; return its path."""
    info = f"{DIST}-1.0.dist-info"
    files = {
        f"{DIST}.py": PLUGIN_SOURCE.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 1.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: kvm-borg-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[kvm_borg]\nkbtest_entry = {DIST}\n".encode(),
    }
    record = "\n".join([_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]) + "\n"
    wheel = directory / f"{DIST}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("entry-point")
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(build_wheel(work))], check=True, capture_output=True, text=True)
    assert (target / f"{DIST}-1.0.dist-info" / "entry_points.txt").is_file()
    return target


def test_an_entry_point_plugin_adds_its_config_key(installed, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nkbtest_entry_key: hello\n")
    without = run_cli("config", "validate", config=config)
    assert without.returncode == 2 and "kbtest_entry_key" in without.stderr
    with_plugin = run_cli("config", "validate", config=config, env={"PYTHONPATH": str(installed)})
    assert with_plugin.returncode == 0, with_plugin.stderr
    assert "valid" in with_plugin.stdout


def test_doctor_lists_the_entry_point_plugin(installed, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    proc = run_cli("doctor", "--json", config=config, env={"PYTHONPATH": str(installed)})
    assert "kbtest_entry" in proc.stdout and "kvm_borg_config_schema" in proc.stdout, proc.stdout
