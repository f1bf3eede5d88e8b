"""Config validation: every error names its key; the embedded default needs no file."""

import pytest

from kvm_borg import config
from kvm_borg.errors import ConfigError

GOOD = """
state_dir: /var/lib/kb
quiesce: off
overlay_min_free: 2GiB
commit_timeout: 30m
repositories:
  - name: local
    type: borg
    path: /srv/borg
    passphrase_file: /etc/kvm-borg/pass
  - name: offsite
    type: restic
    url: sftp:b@h:/r
    passphrase_command: pass show r
"""


def test_good_config_is_normalized_with_defaults():
    data = config.parse_text(GOOD)
    assert data["quiesce"] == "off"  # YAML 1.1 reads `off` as false
    assert data["overlay_min_free"] == 2 * 1024**3
    assert data["commit_timeout"] == 1800
    assert data["libvirt_uri"] == "qemu:///system"
    borg = data["repositories"][0]
    assert borg["compression"] == "lz4" and borg["chunker_params"] == "fixed,4194304"
    assert borg["encryption"] == "repokey-blake2"


@pytest.mark.parametrize(
    "text, message",
    [
        ("state_dir: [unclosed", "malformed YAML at line 1"),
        ("colour: blue", "colour: unknown key"),
        ("quiesce: sometimes", "quiesce: expected one of auto, required, off"),
        ("commit_retries: many", "commit_retries: expected a whole number"),
        ("state_dir: relative/dir", "state_dir: expected an absolute path"),
        ("overlay_min_free: lots", "overlay_min_free: expected a size"),
        ("domains: {include: web}", "domains.include: expected a list of strings"),
        ("domains: {disks_exclude: {web: vdb}}", "domains.disks_exclude.web: expected a list of strings"),
        ("repositories: []", "repositories: expected a non-empty list"),
        ("repositories: [{name: a, type: borg, passphrase_file: /p}]", "repositories[0].path: required"),
        ("repositories: [{name: a, type: tape, path: /x}]", "repositories[0].type: unknown repository type 'tape'"),
        ("repositories: [{name: a, path: /x}]", "repositories[0].type: required"),
        ("repositories: [{name: a, type: borg, path: /x}]", "repositories[0]: an encrypted repository needs"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, retries: 3}]",
         "repositories[0].retries: unknown key"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none}, {name: a, type: borg, path: /y, "
         "encryption: none}]", "repositories[1].name: duplicate repository name 'a'"),
        ("repositories: [{name: a, type: borg, path: /x, passphrase_file: /p, passphrase_command: c}]",
         "repositories[0]: give passphrase_file or passphrase_command, not both"),
        ("- a\n- b", "config: expected a mapping at the top level"),
    ],
)
def test_bad_config_names_the_key(text, message):
    with pytest.raises(ConfigError) as info:
        config.parse_text(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_embedded_default_without_any_file(tmp_path, monkeypatch):
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "missing.yaml")
    settings = config.load_settings(None)
    assert settings.embedded_default
    repo = settings.repositories[0]
    assert repo["type"] == "borg" and repo["encryption"] == "repokey-blake2" and repo["auto_init"]
    assert repo["path"] == "/var/lib/kvm-borg/repository"
    assert repo["passphrase_file"] == "/var/lib/kvm-borg/passphrase"


def test_named_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="config file does not exist"):
        config.load_settings(str(tmp_path / "nope.yaml"))


def test_env_variable_names_the_config(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: /tmp/kb-env\n")
    monkeypatch.setenv(config.CONFIG_ENV, str(path))
    settings = config.load_settings(None)
    assert settings.state_dir.as_posix() == "/tmp/kb-env" and settings.config_path == path


def test_select_repositories_rejects_unknown_names():
    settings = config.Settings(**{**_settings_fields(), "repositories": [{"name": "a"}, {"name": "b"}]})
    assert [r["name"] for r in config.select_repositories(settings, ["b"])] == ["b"]
    with pytest.raises(ConfigError, match="--repo c: no such repository"):
        config.select_repositories(settings, ["c"])


def _settings_fields():
    return dict(libvirt_uri="x", state_dir="/s", overlay_dir=None, overlay_min_free=0, quiesce="auto",
                guest_agent_timeout=1, commit_timeout=1, commit_retries=1, domains={}, plugins=[],
                borg_binary=None, restic_binary=None, hostname="h", repositories=[])


def test_sizes_and_durations():
    assert config.parse_size("500M", "k") == 500 * 2**20
    assert config.parse_size("1.5GB", "k") == 1_500_000_000
    assert config.parse_duration("26h", "k") == 26 * 3600
    assert config.parse_duration(90, "k") == 90
    with pytest.raises(ConfigError):
        config.parse_duration("soon", "k")
