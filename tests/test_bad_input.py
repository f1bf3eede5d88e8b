"""Bad input: one clear line naming the problem, exit code 2, and nothing changed — no snapshot,
no journal entry, no archive, no file written."""

from __future__ import annotations

import os

import pytest

from harness import DiskSpec, run_cli
from support import borg_archives, cli_env, journal_entries, overlay_files, write_config, write_passphrase

REPO_OK = "{name: main, type: borg, path: REPO, passphrase_file: PASS}"

CONFIG_CASES = {
    "malformed YAML": ("repositories: [{name: main", "malformed YAML at line"),
    "unknown key": ("colour: blue\nrepositories: [REPO_OK]", "colour: unknown key"),
    "unknown nested key": ("domains: {includes: ['*']}\nrepositories: [REPO_OK]", "domains.includes: unknown key"),
    "wrong type": ("commit_retries: lots\nrepositories: [REPO_OK]", "commit_retries: expected a whole number"),
    "wrong type of a list": ("plugins: kbtest\nrepositories: [REPO_OK]", "plugins: expected a list of strings"),
    "repository missing its path": ("repositories: [{name: main, type: borg, passphrase_file: PASS}]",
                                    "repositories[0].path: required"),
    "unknown repository type": ("repositories: [{name: main, type: tape, path: REPO}]",
                                "repositories[0].type: unknown repository type 'tape'"),
    "relative state_dir": ("state_dir: kb\nrepositories: [REPO_OK]", "state_dir: expected an absolute path"),
    "bad quiesce mode": ("quiesce: sometimes\nrepositories: [REPO_OK]", "quiesce: expected one of auto, required, off"),
    "bad size": ("overlay_min_free: plenty\nrepositories: [REPO_OK]", "overlay_min_free: expected a size"),
    "missing borg binary": ("borg_binary: /nonexistent/borg\nrepositories: [REPO_OK]",
                            "borg binary /nonexistent/borg not found"),
    "libvirtd not running": ("libvirt_uri: 'qemu+unix:///system?socket=/nonexistent/libvirt-sock'\n"
                             "repositories: [REPO_OK]", "cannot connect to libvirt"),
    "unimportable plugin": ("plugins: [kbtest_no_such_module]\nrepositories: [REPO_OK]",
                            "plugins[0]: cannot import plugin module"),
    "missing passphrase file": ("repositories: [{name: main, type: borg, path: REPO, passphrase_file: /nonexistent/p}]",
                                "passphrase_file /nonexistent/p does not exist"),
}


@pytest.fixture
def running_domain(domain_factory):
    return domain_factory.make(disks=[DiskSpec("vda", "qcow2", 16), DiskSpec("vdb", "raw", 16)])


def _assert_nothing_changed(domain, state_dir, repo):
    assert domain.live_sources() == {t: str(p) for t, p in domain.disks.items()}
    assert overlay_files(domain.dir) == [] and journal_entries(state_dir) == []
    if (repo / "config").exists():
        assert borg_archives(repo) == []


def _one_line_exit_2(proc, message):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kvm-borg: error: ") and message in lines[0]


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_refused_before_anything_changes(case, running_domain, image_dir, tmp_path):
    text, message = CONFIG_CASES[case]
    repo = tmp_path / "repo"
    write_config(image_dir / "good", repo_path=repo)  # an initialised repository that must stay empty
    passphrase = write_passphrase(tmp_path / "pass")
    text = text.replace("REPO_OK", REPO_OK).replace("REPO", str(repo)).replace("PASS", str(passphrase))
    config = image_dir / "bad.yaml"
    config.write_text(f"state_dir: {image_dir / 'state'}\n" + text if "state_dir" not in text else text)
    proc = run_cli("backup", running_domain.name, config=config, env=cli_env())
    _one_line_exit_2(proc, message)
    _assert_nothing_changed(running_domain, image_dir / "state", repo)


@pytest.fixture
def good_config(image_dir, tmp_path):
    return write_config(image_dir / "kb", repo_path=tmp_path / "repo"), image_dir / "kb" / "state", tmp_path / "repo"


def test_nonexistent_domain(running_domain, good_config):
    config, state, repo = good_config
    proc = run_cli("backup", running_domain.name, "kbtest-does-not-exist", config=config, env=cli_env())
    _one_line_exit_2(proc, "domain 'kbtest-does-not-exist' does not exist")
    _assert_nothing_changed(running_domain, state, repo)  # the valid domain was not touched either


def test_disk_target_that_does_not_exist(running_domain, good_config):
    config, state, repo = good_config
    proc = run_cli("backup", running_domain.name, "--exclude-disk", "vdz", config=config, env=cli_env())
    _one_line_exit_2(proc, "disk vdz is not a disk of domain")
    _assert_nothing_changed(running_domain, state, repo)


def test_unknown_repository_name(running_domain, good_config):
    config, state, repo = good_config
    proc = run_cli("backup", running_domain.name, "--repo", "offsite", config=config, env=cli_env())
    _one_line_exit_2(proc, "--repo offsite: no such repository")
    _assert_nothing_changed(running_domain, state, repo)


def test_world_readable_passphrase_file_is_refused(running_domain, good_config):
    config, state, repo = good_config
    os.chmod(config.parent / "passphrase", 0o644)
    proc = run_cli("backup", running_domain.name, config=config, env=cli_env())
    _one_line_exit_2(proc, "is accessible by others (mode 0644)")
    _assert_nothing_changed(running_domain, state, repo)


def test_no_domain_named(good_config):
    config, _, _ = good_config
    _one_line_exit_2(run_cli("backup", config=config, env=cli_env()), "name at least one domain, or use --all")


def test_recover_of_unknown_domain(good_config):
    config, _, _ = good_config
    _one_line_exit_2(run_cli("recover", "kbtest-nope", config=config, env=cli_env()),
                     "domain 'kbtest-nope' does not exist")
