"""A third-party backend plugin (tests/kbtest_plugins/dirstore.py, `type: directory`) is configured
through `plugins:`, its own keys are validated by the schema it contributes, and `kvm-borg backup`
of a real running domain stores into it exactly the frozen disks; `kvm-borg list` shows the archive."""

from __future__ import annotations

import json
import os

import pytest

from harness import DiskSpec, qemu_img_compare, run_cli
from kbtest_plugins.probe import AFTER_SNAPSHOT_LENGTH, AFTER_SNAPSHOT_OFFSET, AFTER_SNAPSHOT_PATTERN
from support import archived_meta, assert_back_on_own_images, cli_env, journal_entries, overlay_files, write_config

MiB = 1 << 20
PLUGINS = ("kbtest_plugins.probe", "kbtest_plugins.dirstore")


def directory_repository(path, **keys) -> dict:
    return {"name": "dirs", "type": "directory", "path": str(path), **keys}


def test_backup_into_a_third_party_backend_stores_the_frozen_disks(domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 32), DiskSpec("vdb", "raw", 32, fill="sparse")],
                                 name="third-party store")
    domain.hmp_write("vda", 0xA7, 4 * MiB, MiB)
    domain.hmp_write("vdb", 0xB7, 4 * MiB, MiB)
    store = tmp_path / "dirs"
    config = write_config(image_dir / "kb", [directory_repository(store, keep_sparse=True)], plugins=PLUGINS)
    assert store.is_dir()  # `kvm-borg init` went through the plugin's backend
    reference = image_dir / "reference"
    reference.mkdir()
    proc = run_cli("backup", domain.name, "--json", config=config,
                   env=cli_env(KBTEST_REFERENCE_DIR=reference, KBTEST_WRITE_AFTER_SNAPSHOT=1))
    assert proc.returncode in (0, 1), proc.stderr
    [result] = json.loads(proc.stdout)["domains"]
    [stored] = result["stores"]
    assert result["ok"] and stored["ok"] and stored["repository"] == "dirs"

    archive = store / stored["archive"]
    meta = archived_meta(archive)
    assert meta["domain"]["name"] == domain.name
    assert sorted(d["target"] for d in meta["disks"]) == ["vda", "vdb"]
    for disk in meta["disks"]:
        image = archive / disk["archive_path"]
        # The stored image is the frozen disk: the guest view at the snapshot, without the write after it.
        assert qemu_img_compare(image, reference / f"{disk['target']}.raw", disk["format"], "raw")
        assert not domain.has_pattern(disk["target"], AFTER_SNAPSHOT_PATTERN, AFTER_SNAPSHOT_OFFSET,
                                      AFTER_SNAPSHOT_LENGTH, path=image, fmt=disk["format"])
    raw = archive / next(d["archive_path"] for d in meta["disks"] if d["target"] == "vdb")
    assert os.stat(raw).st_blocks * 512 < os.stat(raw).st_size  # keep_sparse: the zero blocks are holes
    assert_back_on_own_images(domain, image_dir / "kb" / "state")

    listed = run_cli("list", "--json", config=config, env=cli_env())
    assert listed.returncode == 0, listed.stderr
    [info] = json.loads(listed.stdout)
    assert info["name"] == stored["archive"] and info["repository"] == "dirs" and info["domain"] == domain.name
    assert info["disks"] == ["vda", "vdb"] and info["original_size"] >= 32 * MiB


@pytest.mark.parametrize("keys, plugins, message", [
    ({"keep_sparse": "maybe"}, PLUGINS, "repositories[0].keep_sparse: expected true or false, got 'maybe'"),
    ({"compression": "lz4"}, PLUGINS, "repositories[0].compression: unknown key (known keys: keep_sparse, name, "
                                      "path, type)"),
    ({"path": "relative"}, PLUGINS, "repositories[0].path: expected an absolute path, got 'relative'"),
    ({}, ("kbtest_plugins.probe",), "repositories[0].type: unknown repository type 'directory' (known: borg, restic)"),
], ids=["wrong type of its own key", "a key it does not claim", "bad path", "plugin not listed"])
def test_a_third_party_backends_keys_are_validated(keys, plugins, message, domain_factory, image_dir, tmp_path):
    domain = domain_factory.make(disks=[DiskSpec("vda", "raw", 16)], name="third-party refused")
    store = tmp_path / "dirs"
    config = write_config(image_dir / "kb", [{**directory_repository(store), **keys}], plugins=plugins, init=False)
    proc = run_cli("backup", domain.name, config=config, env=cli_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"kvm-borg: error: {message}"]
    assert not store.exists() and journal_entries(image_dir / "kb" / "state") == [] and overlay_files(domain.dir) == []
    assert domain.live_sources() == {t: str(p) for t, p in domain.disks.items()}
