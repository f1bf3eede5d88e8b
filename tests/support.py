"""Helpers of the kvm-borg tests proper: configs, borg look-ups, the state of a domain after a run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from harness import BORG_BIN, TEST_PASSPHRASE, borg_env, run_cli

TESTS_DIR = Path(__file__).resolve().parent


def write_passphrase(path: Path, passphrase: str = TEST_PASSPHRASE) -> Path:
    """Write a root-only passphrase file and return its path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(passphrase + "\n")
    return path


def write_config(directory: Path, repositories: list[dict] | None = None, *, repo_path: Path | None = None,
                 plugins=("kbtest_plugins.probe",), init: bool = True, **settings) -> Path:
    """Write a config YAML into `directory` (state_dir below it) and return its path.

    Without `repositories`, one encrypted borg repository at `repo_path` (default directory/repo).
    With `init`, `kvm-borg init` creates the repositories. `method` is `snapshot` unless given: these
    tests were written for that method (the default is `auto`; tests/harness/bitmap.py gives `bitmap`)."""
    directory.mkdir(parents=True, exist_ok=True)
    if repositories is None:
        repositories = [{
            "name": "main", "type": "borg", "path": str(repo_path or directory / "repo"),
            "passphrase_file": str(write_passphrase(directory / "passphrase")),
        }]
    data = {"state_dir": str(directory / "state"), "plugins": list(plugins), "repositories": repositories,
            "quiesce": "auto", "method": "snapshot", **settings}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    if init:
        run_cli("init", config=path, env=cli_env(), check=True)
    return path


def cli_env(**extra) -> dict:
    """Environment for `kvm-borg` runs: the test plugins importable, plus `extra` variables."""
    env = {"PYTHONPATH": str(TESTS_DIR) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def borg(*args, base_dir: Path | None = None, passphrase: str = TEST_PASSPHRASE, check=True) -> subprocess.CompletedProcess:
    """Run the venv's borg with the test passphrase; return the CompletedProcess."""
    env = borg_env(passphrase=passphrase, base_dir=base_dir)
    return subprocess.run([str(BORG_BIN), *map(str, args)], env=env, capture_output=True, text=True,
                          check=check, stdin=subprocess.DEVNULL)


def borg_archives(repo: Path) -> list[str]:
    """Return the archive names in a borg repository."""
    return [a["name"] for a in json.loads(borg("list", "--json", repo).stdout)["archives"]]


def extract_archive(repo: Path, archive: str, destination: Path) -> Path:
    """Extract a whole archive into `destination` and return it."""
    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(BORG_BIN), "extract", "--sparse", f"{repo}::{archive}"], cwd=destination, check=True,
                   env=borg_env(), capture_output=True, stdin=subprocess.DEVNULL)
    return destination


def archived_meta(extracted: Path) -> dict:
    """Given an extracted archive, return its meta.json."""
    found = [p for p in extracted.rglob("meta.json")]
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def overlay_files(directory: Path) -> list[Path]:
    """Return kvm-borg overlay files below `directory`."""
    return [p for p in directory.rglob("*.kvm-borg-*.qcow2")]


def journal_entries(state_dir: Path) -> list[Path]:
    """Return pending journal entry files."""
    return list((state_dir / "journal").glob("*.json")) if (state_dir / "journal").exists() else []


def assert_back_on_own_images(test_domain, state_dir: Path) -> None:
    """The domain runs (or is defined) on its original images; no overlay, no journal entry."""
    originals = {t: str(p) for t, p in test_domain.disks.items()}
    if test_domain.is_active():
        assert test_domain.live_sources() == originals
    assert test_domain.inactive_sources() == originals
    assert overlay_files(test_domain.dir) == []
    assert journal_entries(state_dir) == []
