"""Hostile archives: real kvm-borg archives, edited and stored again (tests/harness/crafted.py), restored.

One small real archive per repository type is made once for the module (a shut-off two-disk
domain, borg and restic); every case crafts a variant of it. Each attack aims at names that
carry a fresh marker (`kbpwn-<hex>`), so the check "nothing was written outside the target"
is exact even while other tests write to /tmp or /var/lib/libvirt: no path with the marker
may exist under the aimed-at roots afterwards, the quiet roots (/etc/cron.d, /root) and the
target's parent must list the same before and after, and what lands in the target is plain
files only (no symlink, device, FIFO, setuid/setgid or world-writable file).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import DiskSpec, DomainFactory, make_dir, restic_env, run_cli
from harness.crafted import (
    ATTACK_ROOTS,
    QUIET_ROOTS,
    Tree,
    changed,
    craft_borg,
    craft_restic,
    listing,
    marked_paths,
    special_files,
)
from support import cli_env, write_config, write_passphrase

DISKS = [DiskSpec("vda", "qcow2", 4), DiskSpec("vdb", "raw", 4)]


@dataclass
class Source:
    """The module's real archive: one borg and one restic archive of `domain` (shut off)."""

    domain: object
    config: Path
    borg_repo: Path
    restic_url: str
    borg_archive: str
    restic_archive: str
    work: Path


@pytest.fixture(scope="module")
def source(libvirt_conn, run_dir, run_id, tmp_path_factory):
    work = make_dir(run_dir / f"hostile-{secrets.token_hex(3)}")
    factory = DomainFactory(libvirt_conn, work, run_id, label="hostile")
    try:
        domain = factory.make(disks=DISKS, running=False, name=f"hostile-{secrets.token_hex(2)}")
        tmp = tmp_path_factory.mktemp("hostile")
        repositories = [
            {"name": "borg", "type": "borg", "path": str(tmp / "borg-repo"),
             "passphrase_file": str(write_passphrase(tmp / "borg.pass"))},
            {"name": "restic", "type": "restic", "url": str(tmp / "restic-repo"),
             "passphrase_file": str(write_passphrase(tmp / "restic.pass"))},
        ]
        config = write_config(work / "kb", repositories)
        proc = run_cli("backup", domain.name, "--json", config=config, env=cli_env())
        assert proc.returncode == 0, proc.stderr
        stores = {s["repository"]: s["archive"] for s in json.loads(proc.stdout)["domains"][0]["stores"]}
        yield Source(domain, config, tmp / "borg-repo", str(tmp / "restic-repo"), stores["borg"], stores["restic"],
                     work)
    finally:
        errors = factory.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        assert not errors, errors


def craft(source: Source, kind: str, edit, tmp_path: Path, **kw) -> str:
    """Craft a variant of the module's `kind` ("borg"/"restic") archive; return its name."""
    if kind == "borg":
        return craft_borg(source.borg_repo, source.borg_archive, edit, workdir=tmp_path / "craft", **kw)
    return craft_restic(source.restic_url, source.restic_archive, edit, workdir=tmp_path / "craft",
                        env=restic_env(cache_dir=tmp_path / "restic-cache"), **kw)


class Watch:
    """Before/after view of the host paths an attack aims at (see the module docstring)."""

    def __init__(self, marker: str, target: Path):
        self.marker, self.target = marker, target
        self.quiet = (*QUIET_ROOTS, str(target.parent))
        self.before = listing(self.quiet)
        assert marked_paths(marker) == []

    def assert_nothing_outside(self) -> None:
        assert marked_paths(self.marker) == [], f"the attack wrote under {ATTACK_ROOTS}"
        assert changed(self.before, listing(self.quiet)) == [] or \
            changed(self.before, listing(self.quiet)) == [str(self.target)], "a quiet directory changed"

    def assert_target_plain(self) -> None:
        if self.target.exists():
            assert special_files(self.target) == []


def restore(source: Source, kind: str, archive: str, *args):
    return run_cli("restore", source.domain.name, "--repo", kind, "--archive", archive, *args,
                   config=source.config, env=cli_env())


def assert_refused(proc, *words: str) -> str:
    """Exit 2, one line `kvm-borg: error: ...` (no traceback) naming `words`; return that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kvm-borg: error: "), proc.stderr
    for word in words:
        assert word in last, (word, last)
    return last


@pytest.fixture
def marker() -> str:
    return f"kbpwn-{secrets.token_hex(4)}"


# --- the control: an unedited crafted archive restores ------------------------------------------


@pytest.mark.parametrize("kind", ["borg", "restic"])
def test_an_unedited_crafted_archive_restores_like_the_original(source, kind, tmp_path, marker):
    """The harness itself: kvm-borg lists and restores a re-stored archive, so refusals below come from the edits."""
    archive = craft(source, kind, lambda tree: None, tmp_path)
    listed = run_cli("list", source.domain.name, "--repo", kind, "--json", config=source.config, env=cli_env())
    assert archive in [a["name"] for a in json.loads(listed.stdout)], listed.stdout
    target = tmp_path / "target"
    proc = restore(source, kind, archive, "--target-dir", target, "--json")
    assert proc.returncode == 0, proc.stderr
    disks = json.loads(proc.stdout)["disks"]
    assert set(disks) == {"vda", "vdb"}
    for disk, path in disks.items():
        assert Path(path).parent == target
        assert source.domain.verify_fill(disk, path, source.domain.formats[disk])
