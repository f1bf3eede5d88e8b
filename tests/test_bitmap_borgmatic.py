"""The borgmatic flow (`kvm-borg freeze --expose` / `thaw`, contrib/borgmatic/kvm-borg.yaml) with the bitmap
method: borgmatic's own borg reads the exposed segment directories, its files cache skips the segments that
did not change (only the changed ones are `M` in `borg create --list`), thaw folds the run's state so the next
run is incremental, nothing is left behind, and `kvm-borg restore` restores each archive borgmatic made
exactly to the guest view at its instant."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import yaml

from harness import DiskSpec, VENV_BIN
from harness.bitmap import MiB, KiB, SEGMENT_SIZE, DiskModel, assert_restores_to, bitmap_settings, leftovers, \
    short_scratch_dir, touched_segments
from support import assert_back_on_own_images, borg_archives, cli_env, write_config
from test_borgmatic import assert_nothing_exposed, borgmatic, borgmatic_config


@pytest.fixture
def scratch(run_dir):
    directory = short_scratch_dir(run_dir)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def listed_segments(output: str, domain: str, target: str, status: str) -> set[int]:
    """Given borgmatic's output of `borg create --list`, return the indexes of the `target` segment files
    listed with `status` (A, M, ...)."""
    pattern = re.compile(rf"^{status} .*/{re.escape(domain)}/disks/{target}/(\d{{8}})$")
    return {int(m.group(1)) for line in output.splitlines() if (m := pattern.match(line.strip()))}


def test_borgmatic_reads_only_the_changed_segments_and_every_archive_restores(domain_factory, image_dir, tmp_path,
                                                                             scratch):
    domain = domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16, fill="sparse")], name="bm-borgmatic")
    model = DiskModel.of(domain, "vda", tmp_path / "model")
    repo = tmp_path / "repo"
    kb = image_dir / "kb"
    config = write_config(kb, repo_path=repo, plugins=[], domains={"include": [domain.name]},
                          **bitmap_settings(scratch_dir=str(scratch)))
    expose = image_dir / "expose"
    env = {**os.environ, **cli_env(KVM_BORG_CONFIG=config), "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "BORG_BASE_DIR": str(tmp_path / "borg-base")}
    bm_config = borgmatic_config(tmp_path, repo, expose, kb / "passphrase")
    data = yaml.safe_load(bm_config.read_text())
    data["list_details"] = True  # borg create --list --filter AME: what borg read, not what its cache skipped
    bm_config.write_text(yaml.safe_dump(data))
    segments = 16 * MiB // SEGMENT_SIZE

    first = borgmatic("create", config=bm_config, env=env)
    assert first.returncode == 0
    output = first.stdout + first.stderr
    assert listed_segments(output, domain.name, "vda", "A") == set(range(segments))
    references = [model.at_instant(tmp_path / "ref1.raw")]
    model.take_dirty()

    model.write(0x5C, 3 * MiB + 100 * KiB, 300 * KiB)  # two segments
    second = borgmatic("create", config=bm_config, env=env)
    assert second.returncode == 0
    output = second.stdout + second.stderr
    assert listed_segments(output, domain.name, "vda", "M") == touched_segments(3 * MiB + 100 * KiB, 300 * KiB)
    assert listed_segments(output, domain.name, "vda", "A") == set()
    references.append(model.at_instant(tmp_path / "ref2.raw"))

    assert_nothing_exposed(expose, kb / "state")
    assert leftovers(domain.dom, kb / "state", scratch) == []
    assert_back_on_own_images(domain, kb / "state")
    archives = borg_archives(repo)
    assert len(archives) == 2
    for archive, reference in zip(archives, references):
        assert_restores_to(config, domain.name, "vda", reference, tmp_path, archive=archive)
