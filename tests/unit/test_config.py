"""Config validation: every error names its key; the embedded default needs no file."""

import os
import re
from pathlib import Path

import pytest

from kvm_borg import config, config_cache, config_docs, config_formats, config_schema, config_validate
from kvm_borg.errors import ConfigError
from kvm_borg.plugins import make_plugin_manager

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
    assert data["quiesce"] == "off"  # YAML 1.2: `off` is the string the user wrote
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
        # out of range: negative, zero where meaningless, absurdly large (would overflow)
        ("commit_timeout: -5", "commit_timeout: expected a duration"),
        ("commit_timeout: 0", "commit_timeout: expected a duration greater than zero"),
        ("guest_agent_timeout: 0s", "guest_agent_timeout: expected a duration greater than zero"),
        ("max_age: 0", "max_age: expected a duration greater than zero"),
        ("commit_timeout: 1e400", "commit_timeout: inf is too long (at most 366d)"),
        ("commit_timeout: .inf", "commit_timeout: inf is too long"),
        ("commit_timeout: .nan", "commit_timeout: expected a duration"),
        ("commit_timeout: " + "9" * 400 + "w", "commit_timeout: '999"),
        ("commit_timeout: " + "9" * 400, "commit_timeout: 999"),
        ("max_age: 367d", "max_age: '367d' is too long (at most 366d)"),
        ("commit_retries: 0", "commit_retries: expected a whole number ≥ 1"),
        ("commit_retries: 100000000000000000000", "commit_retries: 100000000000000000000 is too large"),
        ("overlay_min_free: -1", "overlay_min_free: expected a size"),
        ("overlay_min_free: " + "9" * 400 + "TiB", "is too large (at most 1EiB)"),
        ("overlay_min_free: 2EiB", "overlay_min_free: expected a size"),
        ("overlay_min_free: 10000000000TiB", "overlay_min_free: '10000000000TiB' is too large"),
        # a plugin's keys are valid once the plugin is listed
        ("plugins: [kvm_borg_hooks.webhook]\nwebhook: {url: 'http://127.0.0.1:1/', timeout: 0}",
         "webhook.timeout: expected a duration greater than zero"),
        ("plugins: [kvm_borg_hooks.prefreeze]\nprefreeze: {web: {timeout: 99999d}}",
         "prefreeze.web.timeout: '99999d' is too long"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, lock_wait: 99999999}]",
         "repositories[0].lock_wait: 99999999 is too large"),
        # ssh_command must split like a shell line
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, ssh_command: \"ssh -o 'x\"}]",
         "repositories[0].ssh_command: cannot split \"ssh -o 'x\": No closing quotation"),
        ("repositories: [{name: a, type: restic, url: /r, passphrase_file: /p, ssh_command: 'ssh \\'}]",
         "repositories[0].ssh_command: cannot split"),
        # duplicate keys, at any depth, are refused naming the key
        ("state_dir: /a\nstate_dir: /b", "config: duplicate key 'state_dir' at line 2"),
        ("repositories: [{name: a, name: b, type: borg, path: /x}]", "config: duplicate key 'name' at line 1"),
        # a string key given a bool or a number: refused with a hint to quote it
        ("repositories: [{name: true, type: borg, path: /x, encryption: none}]",
         "repositories[0].name: expected a non-empty string, got True (quote it"),
        ("repositories: [{name: 12, type: borg, path: /x, encryption: none}]",
         "repositories[0].name: expected a non-empty string, got 12 (quote it"),
        ("repositories: [{name: a, type: borg, path: /x, passphrase_command: 1}]",
         "repositories[0].passphrase_command: expected a non-empty string, got 1 (quote it"),
        ("domains: {include: [web, false]}", "domains.include[1]: expected a string, got False (quote it"),
        ("domains: {disks_exclude: {true: [vda]}}", "domains.disks_exclude.True: expected a name (a string)"),
        ("domains_retention: {1.5: {keep_daily: 1}}", "domains_retention.1.5: expected a name (a string), got 1.5"),
        ("hostname: 123", "hostname: expected a non-empty string, got 123 (quote it"),
        # borg compression and chunker params are checked at load with borg's own limits
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, compression: 'zstd,23'}]",
         "repositories[0].compression: bad value 'zstd,23': zstd level must be 1..22"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, compression: gzip}]",
         "repositories[0].compression: bad value 'gzip': expected none, lz4"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, compression: 'obfuscate,7,lz4'}]",
         "obfuscate level must be 1..6, 110..123 or 250"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, chunker_params: 'fixed,32'}]",
         "repositories[0].chunker_params: bad value 'fixed,32': block size must be at least 64 bytes"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, chunker_params: 'fixed,99999999'}]",
         "block and header size must not exceed 20971479 bytes"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, chunker_params: 'buzhash,19,24,21,4095'}]",
         "chunk size exponents must be within 6..23"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, chunker_params: 'buzhash,19,23,21,4096'}]",
         "HASH_WINDOW_SIZE must be odd"),
        ("repositories: [{name: a, type: borg, path: /x, encryption: none, chunker_params: 'fixed,4M'}]",
         "block size must be a whole number, got '4M'"),
        ("repositories: [{name: a, type: restic, url: /r, passphrase_file: /p, compression: zstd}]",
         "repositories[0].compression: expected one of auto, off, max, got 'zstd'"),
        # state_dir: normalized, never a system directory
        ("state_dir: /", "state_dir: '/' is a system directory (/)"),
        ("state_dir: /var/lib/../../etc/", "state_dir: '/var/lib/../../etc/' is a system directory (/etc)"),
        ("state_dir: /usr", "state_dir: '/usr' is a system directory"),
        ("state_dir: /var/lib", "state_dir: '/var/lib' is a system directory"),
        # the bitmap method's keys
        ("method: fast", "method: expected one of auto, snapshot, bitmap, got 'fast'"),
        ("method: off", "method: expected one of auto, snapshot, bitmap, got 'off'"),
        ("domains_method: {web: incremental}", "domains_method.web: expected one of auto, snapshot, bitmap"),
        ("domains_method: [web]", "domains_method: expected a mapping of domain names or globs to methods"),
        ("segment_size: 100K", "segment_size: expected a multiple of 64KiB from 64KiB to 1GiB, got '100K'"),
        ("segment_size: 32KiB", "segment_size: expected a multiple of 64KiB from 64KiB to 1GiB"),
        ("segment_size: 2GiB", "segment_size: expected a multiple of 64KiB from 64KiB to 1GiB, got '2GiB'"),
        ("segment_size: 0", "segment_size: expected a multiple of 64KiB"),
        ("segment_size: big", "segment_size: expected a size like 1GiB"),
        ("scratch_dir: scratch", "scratch_dir: expected an absolute path, got 'scratch'"),
        ("scratch_dir: /var/tmp/", "scratch_dir: '/var/tmp/' is a system directory (/var/tmp); use a directory of "
                                   "its own such as /var/lib/kvm-borg/scratch"),
        ("scratch_min_free: -1", "scratch_min_free: expected a size"),
    ],
)
def test_bad_config_names_the_key(text, message):
    with pytest.raises(ConfigError) as info:
        config.parse_text(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_bitmap_method_keys_default_and_normalize(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"state_dir: {tmp_path / 'kb'}\n")
    settings = config.load_config(str(path))[0]
    assert settings.method == "auto" and settings.domains_method == {}
    assert settings.segment_size == 4 * 2**20 and settings.scratch_min_free == 2**30
    assert settings.scratch_dir == tmp_path / "kb" / "scratch" and settings.full_read is False
    path.write_text(f"state_dir: {tmp_path / 'kb'}\nmethod: snapshot\ndomains_method: {{'db-*': bitmap, web: snapshot}}\n"
                    f"segment_size: 256KiB\nscratch_dir: {tmp_path / 'scratch'}\nscratch_min_free: 64M\n")
    settings = config.load_config(str(path))[0]
    assert settings.method == "snapshot" and list(settings.domains_method.items()) == [("db-*", "bitmap"), ("web", "snapshot")]
    assert settings.segment_size == 256 * 1024 and settings.scratch_min_free == 64 * 2**20
    assert settings.scratch_dir == tmp_path / "scratch"
    assert config_formats.segment_size(65536, "k") == 65536 and config_formats.segment_size("1GiB", "k") == 2**30


def test_embedded_default_without_any_file(tmp_path, monkeypatch):
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "missing.yaml")
    settings = config.load_config(None)[0]
    assert settings.embedded_default
    repo = settings.repositories[0]
    assert repo["type"] == "borg" and repo["encryption"] == "repokey-blake2" and repo["auto_init"]
    assert repo["path"] == "/var/lib/kvm-borg/repository"
    assert repo["passphrase_file"] == "/var/lib/kvm-borg/passphrase"


def test_named_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="config file does not exist"):
        config.load_config(str(tmp_path / "nope.yaml"))[0]


def test_env_variable_names_the_config(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: /tmp/kb-env\n")
    monkeypatch.setenv(config.CONFIG_ENV, str(path))
    settings = config.load_config(None)[0]
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
    assert config_formats.parse_size("500M", "k") == 500 * 2**20
    assert config_formats.parse_size("1.5GB", "k") == 1_500_000_000
    assert config_formats.parse_duration("26h", "k") == 26 * 3600
    assert config_formats.parse_duration(90, "k") == 90
    with pytest.raises(ConfigError):
        config_formats.parse_duration("soon", "k")


def test_yaml_1_2_scalars_stay_the_strings_the_user_wrote():
    data = config.parse_text("""
quiesce: off
domains: {include: [off, no, yes, on, y, n, 'true'], exclude: [NO]}
repositories:
  - {name: no, type: borg, path: /x, passphrase_command: off}
  - {name: off, type: restic, url: /r, passphrase_file: /p, host: on}
""")
    assert data["quiesce"] == "off"
    assert data["domains"]["include"] == ["off", "no", "yes", "on", "y", "n", "true"]
    assert data["domains"]["exclude"] == ["NO"]
    assert [r["name"] for r in data["repositories"]] == ["no", "off"]
    assert data["repositories"][0]["passphrase_command"] == "off" and data["repositories"][1]["host"] == "on"


def test_duplicate_keys_in_a_nested_mapping_are_refused():
    with pytest.raises(ConfigError, match="duplicate key 'include' at line 3"):
        config.parse_text("domains:\n  include: [a]\n  include: [b]\n")


def test_state_dir_is_normalized_and_symlinks_resolved(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert config.parse_text(f"state_dir: {tmp_path}/link/./sub/..//")["state_dir"] == str(tmp_path / "real")
    (tmp_path / "to-etc").symlink_to("/etc")
    with pytest.raises(ConfigError, match="is a system directory \\(/etc\\)"):
        config.parse_text(f"state_dir: {tmp_path}/to-etc")


def test_state_dir_not_owned_by_root_is_refused_when_running_as_root(tmp_path):
    mine = tmp_path / "kb"
    mine.mkdir()
    os.chown(mine, 0, 0) if os.geteuid() == 0 else None
    config.check_state_dir_owner(str(mine), euid=0 if os.geteuid() == 0 else os.geteuid())
    config.check_state_dir_owner(str(mine / "not" / "yet"), euid=os.geteuid())  # nearest existing: mine
    if os.geteuid() != 0:
        return  # (the harness runs as root; without it only the non-root branch is reachable)
    os.chown(mine, 1234, 1234)
    before = os.stat(mine).st_mode
    with pytest.raises(ConfigError, match="state_dir: state_dir is owned by uid 1234, not root"):
        config.check_state_dir_owner(str(mine))
    with pytest.raises(ConfigError, match=f"state_dir's parent {mine} is owned by uid 1234"):
        config.check_state_dir_owner(str(mine / "state"))
    assert os.stat(mine).st_mode == before  # nothing chmod'ed


@pytest.mark.parametrize("content, message", [
    (b"", "config file is empty"),
    (b"  \n\n", "config file is empty"),
    (b"# only a comment\n", "config file has no settings"),
    (b"state_dir: /var/lib/kb\xff\n", "not UTF-8 text (byte 0xff at line 1)"),
    (b"a: 1\n\xc3\x28: 2\n", "not UTF-8 text (byte 0xc3 at line 2)"),
])
def test_unusable_config_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        config.load_config(str(path))[0]
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_config_that_is_a_directory_or_unreadable_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file is a directory"):
        config.load_config(str(tmp_path))[0]
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: /var/lib/kb\n")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any mode: a FIFO-free way to fail a read is a dangling symlink loop
        path.unlink()
        path.symlink_to(path)
        message = "cannot read: Too many levels of symbolic links"
    else:
        message = "cannot read: Permission denied"
    with pytest.raises(ConfigError, match=message):
        config.load_config(str(path))[0]


# --- one schema: the sample, the README table, plugins' keys ---------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def test_generated_sample_validates_and_sets_every_key_to_its_default():
    schema, owners = config_docs.documented_schema()
    sample = config_docs.sample_config(schema, owners)
    data = config.parse_text(sample)
    [repository] = data["repositories"]
    defaults = config.validate({"repositories": [repository]})
    assert data == defaults  # round trip: what the sample sets is exactly what the schema defaults to
    assert repository["type"] == "borg" and repository["compression"] == "lz4"
    for name in schema["properties"]:
        assert f"\n{name}:" in sample or f"\n# {name}:" in sample, name
    assert set(owners) == {"webhook", "prefreeze"}
    assert "\nwebhook:" not in sample and "\n# webhook:" in sample  # a plugin's key is commented: plugins: []


def test_sample_plugin_keys_validate_once_their_plugins_are_listed():
    schema, owners = config_docs.documented_schema()
    uncommented = "\n".join(line[2:] if line.startswith(("# webhook:", "#   healthchecks_url", "# prefreeze:"))
                            else line for line in config_docs.sample_config(schema, owners).splitlines())
    uncommented = uncommented.replace("plugins: []", "plugins: [kvm_borg_hooks.webhook, kvm_borg_hooks.prefreeze]")
    data = config.parse_text(uncommented)
    assert data["webhook"]["healthchecks_url"] == "https://hc-ping.com/YOUR-UUID" and data["webhook"]["timeout"] == 10
    assert data["prefreeze"] == {}


def test_readme_key_table_is_the_one_generated_from_the_schema():
    table = config_docs.readme_table(*config_docs.documented_schema())
    assert table in README.read_text(encoding="utf-8"), (
        "README.md's configuration table differs from the schema: paste `python -m kvm_borg.config_docs readme-table`")


@pytest.mark.parametrize("word", ["off", "yes", "no", "on"])
def test_yaml_1_2_repository_and_domain_names_stay_strings(word):
    data = config.parse_text(f"domains: {{include: [{word}], exclude: [{word}]}}\n"
                             f"repositories: [{{name: {word}, type: borg, path: /x, encryption: none}}]\n")
    assert data["repositories"][0]["name"] == word
    assert data["domains"]["include"] == [word] and data["domains"]["exclude"] == [word]


def test_a_plugins_key_without_its_plugin_is_an_unknown_key():
    with pytest.raises(ConfigError, match=r"^webhook: unknown key \(known keys: ") as info:
        config.parse_text("webhook: {url: 'http://127.0.0.1:1/'}")
    assert "webhook" not in str(info.value).split("known keys: ")[1]


def test_plugin_keys_are_validated_by_the_plugins_schema():
    with pytest.raises(ConfigError, match="webhook: give at least one of url"):
        config.parse_text("plugins: [kvm_borg_hooks.webhook]\nwebhook: {timeout: 5s}")
    with pytest.raises(ConfigError, match=r"prefreeze.db.before\[0\]: expected a command string or a list of strings"):
        config.parse_text("plugins: [kvm_borg_hooks.prefreeze]\nprefreeze: {db: {before: [[]]}}")
    data = config.parse_text("plugins: [kvm_borg_hooks.prefreeze]\nprefreeze: {db: {before: [sync]}}")
    assert data["prefreeze"] == {"db": {"before": ["sync"], "after": [], "timeout": 60.0, "required": False}}


def test_a_third_party_repository_type_brings_its_own_keys():
    head = "plugins: [kbtest_plugins.dirstore]\nrepositories: [{name: d, type: directory, path: /srv/d"
    [repo] = config.parse_text(head + "}]")["repositories"]
    assert repo == {"name": "d", "type": "directory", "path": "/srv/d", "keep_sparse": True}
    with pytest.raises(ConfigError, match=r"^repositories\[0\].keep_sparse: expected true or false, got 'maybe'$"):
        config.parse_text(head + ", keep_sparse: maybe}]")
    with pytest.raises(ConfigError, match=r"^repositories\[0\].compression: unknown key \(known keys: keep_sparse, "
                                          r"name, path, type\)$"):
        config.parse_text(head + ", compression: lz4}]")
    with pytest.raises(ConfigError, match=r"^repositories\[0\].type: unknown repository type 'directory' "
                                          r"\(known: borg, restic\)$"):
        config.parse_text("repositories: [{name: d, type: directory, path: /srv/d}]")
    with pytest.raises(ConfigError, match=r"known: borg, restic, directory\)$"):
        config.parse_text("plugins: [kbtest_plugins.dirstore]\nrepositories: [{name: d, type: tape}]")


def test_a_key_or_type_two_plugins_claim_is_refused():
    with pytest.raises(ConfigError, match="plugin b: config key 'x' is already claimed by a"):
        config_schema.merge_contributions([("a", {"keys": {"x": {}}}), ("b", {"keys": {"x": {}}})])
    with pytest.raises(ConfigError, match="plugin b: repository type 'borg' is already claimed by a"):
        config_schema.merge_contributions([("a", {"repository_types": {"borg": {}}}),
                                           ("b", {"repository_types": {"borg": {}}})])
    with pytest.raises(ConfigError, match="plugin a: config key 'state_dir' is already claimed by kvm_borg"):
        config_schema.merge_contributions([("a", {"keys": {"state_dir": {}}})])
    with pytest.raises(ConfigError, match="plugin a: kvm_borg_config_schema returned unknown part 'types'"):
        config_schema.merge_contributions([("a", {"types": {}})])


def test_the_built_in_backends_contribute_the_borg_and_restic_types():
    contributions = dict(config.plugin_schema_contributions(make_plugin_manager((), entry_points=False)))
    assert list(contributions["kvm_borg.backends.borg.schema"]["repository_types"]) == ["borg"]
    assert list(contributions["kvm_borg.backends.restic.schema"]["repository_types"]) == ["restic"]


def test_validation_does_not_change_the_document():
    document = {"repositories": [{"name": "a", "type": "borg", "path": "/x", "encryption": "none"}]}
    before = repr(document)
    config.validate(document)
    assert repr(document) == before


# --- the validated-config cache ---------------------------------------------------------------

CACHED = {"repositories": [{"name": "a", "type": "borg", "path": "/x", "encryption": "none"}]}


def _schema():
    return config.schema_for(make_plugin_manager((), entry_points=False))


def test_a_document_validated_before_skips_the_structure_check_and_is_still_normalized(tmp_path, monkeypatch):
    cache = tmp_path / "run" / "validated"
    (tmp_path / "run").mkdir(mode=0o700)
    schema = _schema()
    first = config_validate.validate(schema, CACHED, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1
    monkeypatch.setattr(config_validate, "check_structure", lambda *_: pytest.fail("structure checked again"))
    assert config_validate.validate(schema, CACHED, cache_dir=cache) == first
    assert first["repositories"][0]["compression"] == "lz4"  # normalized: defaults filled in


def test_the_cache_never_remembers_an_invalid_document_nor_confuses_true_with_its_text(tmp_path):
    cache = tmp_path / "run" / "validated"
    (tmp_path / "run").mkdir(mode=0o700)
    schema = _schema()
    config_validate.validate(schema, {"domains": {"disks_exclude": {"true": ["vda"]}}}, cache_dir=cache)
    with pytest.raises(ConfigError, match="domains.disks_exclude.True: expected a name"):
        config_validate.validate(schema, {"domains": {"disks_exclude": {True: ["vda"]}}}, cache_dir=cache)
    with pytest.raises(ConfigError, match="commit_retries"):
        config_validate.validate(schema, {"commit_retries": 0}, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1  # only the valid document


def test_a_cache_directory_open_to_others_is_not_trusted(tmp_path):
    parent = tmp_path / "run"
    parent.mkdir(mode=0o700)
    cache = parent / "validated"
    name = config_cache.digest(_schema(), CACHED)
    config_cache.remember(name, cache)
    assert config_cache.is_validated(name, cache)
    os.chmod(cache, 0o777)
    assert not config_cache.is_validated(name, cache)
    os.chmod(cache, 0o700)
    (cache / name).unlink()
    (cache / name).symlink_to("/etc/hostname")
    assert not config_cache.is_validated(name, cache)


def test_a_missing_required_key_is_named_before_the_rules_across_keys():
    with pytest.raises(ConfigError, match=r"^repositories\[0\].path: required$"):
        config.parse_text("repositories: [{name: a, type: borg}]")
    with pytest.raises(ConfigError, match=r"^repositories\[0\].url: required$"):
        config.parse_text("repositories: [{name: a, type: restic}]")


def test_backup_full_sets_settings_full_read_for_this_run_only(monkeypatch, capsys):
    from kvm_borg import cli_args
    from kvm_borg.actions import backup
    from kvm_borg.actions.common import Context
    from kvm_borg.models import RunSummary

    parser = cli_args.build_parser()
    assert parser.parse_args(["backup", "--full", "web"]).full is True
    assert parser.parse_args(["backup", "web"]).full is False
    seen = []
    monkeypatch.setattr(backup, "backup_from_names", lambda ctx, *_: seen.append(ctx.settings.full_read) or RunSummary())
    for argv in (["backup", "--full", "web"], ["backup", "web"]):
        ctx = Context(config.Settings(**_settings_fields()), None)
        assert backup.run_from_args(ctx, parser.parse_args(argv)) == 0
    assert seen == [True, False]
    backup_parser = parser._subparsers._group_actions[0].choices["backup"]
    [full] = [action for action in backup_parser._actions if "--full" in action.option_strings]
    assert full.help == "read every segment this run (bitmap method); a deliberate full re-read"
