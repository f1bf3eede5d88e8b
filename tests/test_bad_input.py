"""Bad input: one clear line naming the problem, exit code 2, and nothing changed — no snapshot,
no journal entry, no archive, no file written."""

from __future__ import annotations

import json
import os
import stat

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
    "negative duration": ("commit_timeout: -30\nrepositories: [REPO_OK]", "commit_timeout: expected a duration"),
    "zero timeout": ("guest_agent_timeout: 0\nrepositories: [REPO_OK]",
                     "guest_agent_timeout: expected a duration greater than zero"),
    "duration that overflows": ("commit_timeout: 1e999\nrepositories: [REPO_OK]", "commit_timeout: inf is too long"),
    "size that overflows": ("overlay_min_free: " + "9" * 400 + "TiB\nrepositories: [REPO_OK]",
                            "overlay_min_free: '999"),
    "too many jobs": ("jobs: 65\nrepositories: [REPO_OK]", "jobs: 65 is too large (at most 64)"),
    "absurd retry count": ("commit_retries: 10000000000000000000000\nrepositories: [REPO_OK]",
                           "commit_retries: 10000000000000000000000 is too large (at most 100)"),
    "unbalanced quotes in ssh_command": (
        "repositories: [{name: main, type: borg, path: REPO, passphrase_file: PASS, ssh_command: \"ssh -i '/k\"}]",
        "repositories[0].ssh_command: cannot split \"ssh -i '/k\": No closing quotation"),
    "duplicate key": ("repositories: [REPO_OK]\nquiesce: auto\nquiesce: required", "duplicate key 'quiesce' at line 4"),
    "bad borg compression": (
        "repositories: [{name: main, type: borg, path: REPO, passphrase_file: PASS, compression: 'zstd,99'}]",
        "repositories[0].compression: bad value 'zstd,99': zstd level must be 1..22"),
    "bad borg chunker_params": (
        "repositories: [{name: main, type: borg, path: REPO, passphrase_file: PASS, chunker_params: 'fixed,4M'}]",
        "repositories[0].chunker_params: bad value 'fixed,4M': block size must be a whole number"),
    "boolean where a name belongs": (
        "repositories: [{name: true, type: borg, path: REPO, passphrase_file: PASS}]",
        "repositories[0].name: expected a non-empty string, got True (quote it"),
    "number in domains.include": ("domains: {include: [web, 1]}\nrepositories: [REPO_OK]",
                                  "domains.include[1]: expected a string, got 1 (quote it"),
    "segment_size not a multiple of 64KiB": ("segment_size: 100K\nrepositories: [REPO_OK]",
                                             "segment_size: expected a multiple of 64KiB from 64KiB to 1GiB"),
    "state_dir is /": ("state_dir: /\nrepositories: [REPO_OK]", "state_dir: '/' is a system directory (/)"),
    "state_dir resolves to /etc": ("state_dir: /var/lib/../../etc\nrepositories: [REPO_OK]",
                                   "state_dir: '/var/lib/../../etc' is a system directory (/etc)"),
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
    system_modes = {d: os.stat(d).st_mode for d in ("/", "/etc")}
    proc = run_cli("backup", running_domain.name, config=config, env=cli_env())
    _one_line_exit_2(proc, message)
    _assert_nothing_changed(running_domain, image_dir / "state", repo)
    assert {d: os.stat(d).st_mode for d in system_modes} == system_modes  # nothing chmod'ed


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


def test_jobs_outside_1_to_64(running_domain, good_config):
    config, state, repo = good_config
    proc = run_cli("backup", running_domain.name, "--jobs", "0", config=config, env=cli_env())
    _one_line_exit_2(proc, "--jobs 0: expected a whole number from 1 to 64")
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


@pytest.mark.parametrize("case", ["not UTF-8", "empty", "only comments", "a directory", "unreadable"])
def test_unusable_config_file_is_refused_before_anything_changes(case, running_domain, image_dir, tmp_path):
    repo = tmp_path / "repo"
    write_config(image_dir / "good", repo_path=repo)
    config = image_dir / "bad.yaml"
    if case == "not UTF-8":
        config.write_bytes(b"state_dir: /var/lib/kvm-borg-\xe9t\xe9\n")  # Latin-1, not UTF-8
        message = "not UTF-8 text (byte 0xe9 at line 1)"
    elif case == "empty":
        config.write_bytes(b"")
        message = "config file is empty"
    elif case == "only comments":
        config.write_text("# state_dir: /var/lib/kb\n")
        message = "config file has no settings"
    elif case == "a directory":
        config.mkdir()
        message = "config file is a directory"
    else:  # root reads any mode; a symlink loop is a file nobody can read
        config.symlink_to(config)
        message = "cannot read: Too many levels of symbolic links"
    proc = run_cli("backup", running_domain.name, config=config, env=cli_env())
    _one_line_exit_2(proc, message)
    _assert_nothing_changed(running_domain, image_dir / "good" / "state", repo)


def test_state_dir_not_owned_by_root_is_refused_and_not_chmoded(running_domain, image_dir, tmp_path):
    foreign = image_dir / "foreign"
    foreign.mkdir(mode=0o755)
    os.chown(foreign, 4242, 4242)
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo", state_dir=str(foreign), init=False)
    proc = run_cli("backup", running_domain.name, config=config, env=cli_env())
    _one_line_exit_2(proc, "state_dir: state_dir is owned by uid 4242, not root")
    assert stat.S_IMODE(os.stat(foreign).st_mode) == 0o755 and os.stat(foreign).st_uid == 4242
    assert list(foreign.iterdir()) == []
    _assert_nothing_changed(running_domain, foreign, tmp_path / "repo")


def test_backup_all_matching_no_domain_is_an_error(running_domain, image_dir, tmp_path):
    config = write_config(image_dir / "kb", repo_path=tmp_path / "repo",
                          domains={"include": ["kbtest-nothing-is-called-this-*"], "exclude": []})
    proc = run_cli("backup", "--all", config=config, env=cli_env())
    _one_line_exit_2(proc, "--all: no domain matches domains.include/exclude (include: kbtest-nothing-is-called-this-*")
    _assert_nothing_changed(running_domain, image_dir / "kb" / "state", tmp_path / "repo")


def test_yaml_1_2_keeps_off_and_no_the_strings_written(running_domain, image_dir, tmp_path):
    """`name: off` (a repository) and `no` in domains.include stay strings: the backup uses them as names."""
    passphrase = write_passphrase(tmp_path / "pass")
    config = image_dir / "c.yaml"
    config.write_text(f"state_dir: {image_dir / 'state'}\nplugins: [kbtest_plugins.probe]\n"
                      f"domains: {{include: [no, {running_domain.name}]}}\n"
                      f"repositories: [{{name: off, type: borg, path: {tmp_path / 'repo'}, passphrase_file: {passphrase}}}]\n")
    run_cli("init", config=config, env=cli_env(), check=True)
    proc = run_cli("backup", "--all", "--repo", "off", "--json", config=config, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    [domain] = json.loads(proc.stdout)["domains"]
    assert domain["domain"] == running_domain.name and domain["stores"][0]["repository"] == "off"
    assert len(borg_archives(tmp_path / "repo")) == 1
