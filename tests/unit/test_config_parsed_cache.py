"""The parsed-document cache (kvm_borg.config_cache.parsed_document / remember_document): a config text
parsed once is not parsed again, an edited text never finds a stale entry, and an entry that is corrupt,
foreign, open to others or swapped is ignored (the text is parsed again, with the same result and errors)."""

from __future__ import annotations

import os
import stat

import pytest

from kvm_borg import config, config_cache
from kvm_borg.errors import ConfigError

TEXT = """\
state_dir: /var/lib/kvm-borg
name_like: off          # YAML 1.2: the string "off"
numbers: [1, 1.5, -0.0, 12345678901234567890]
repositories:
  - {name: local, type: borg, path: "/srv/borg", passphrase_file: /etc/kvm-borg/passphrase}
"""


@pytest.fixture
def cache(tmp_path):
    """A private parent (as /run/kvm-borg is) and the cache directory below it (created on first use)."""
    (tmp_path / "run").mkdir(mode=0o700)
    return tmp_path / "run" / "parsed"


def no_parser(monkeypatch):
    """Make any use of the YAML parser fail the test."""
    monkeypatch.setattr(config, "load_yaml", lambda *_: pytest.fail("the YAML text was parsed again"))


def entry_path(cache, text=TEXT):
    return cache / config_cache.text_digest(text)


def test_a_text_parsed_once_comes_back_from_the_cache_equal_and_with_the_same_types(cache, monkeypatch):
    first = config.parse_config_text(TEXT, "c.yaml", cache)
    assert first == config.load_yaml(TEXT) and first["name_like"] == "off"
    no_parser(monkeypatch)
    again = config.parse_config_text(TEXT, "c.yaml", cache)
    assert again == first
    assert config_cache._canonical(again) == config_cache._canonical(first)  # 1 stays int, -0.0 float, "off" str
    assert [type(n) for n in again["numbers"]] == [int, float, float, int]


def test_the_entry_is_0600_in_a_0700_directory_of_ours(cache):
    config.parse_config_text(TEXT, "c.yaml", cache)
    info, directory = os.lstat(entry_path(cache)), os.lstat(cache)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(directory.st_mode) == 0o700 and directory.st_uid == os.geteuid()
    assert [p.name for p in cache.iterdir()] == [entry_path(cache).name]  # no temp file left


def test_an_edited_text_is_parsed_again_never_served_stale(cache):
    config.parse_config_text(TEXT, "c.yaml", cache)
    edited = TEXT.replace("/srv/borg", "/srv/other")
    assert config.parse_config_text(edited, "c.yaml", cache)["repositories"][0]["path"] == "/srv/other"
    assert config.parse_config_text(TEXT, "c.yaml", cache)["repositories"][0]["path"] == "/srv/borg"
    assert config.parse_config_text(TEXT + " ", "c.yaml", cache) == config.load_yaml(TEXT)  # one byte: another entry
    assert len(list(cache.iterdir())) == 3


@pytest.mark.parametrize("damage", ["truncated", "not json", "not utf-8", "empty", "other text's entry",
                                    "wrong header", "a directory", "a symlink"])
def test_a_corrupt_or_swapped_entry_is_ignored_and_replaced(cache, damage):
    config.parse_config_text(TEXT, "c.yaml", cache)
    path, good = entry_path(cache), entry_path(cache).read_bytes()
    other = "state_dir: /somewhere/else\n"
    config.parse_config_text(other, "c.yaml", cache)
    path.unlink()
    if damage == "truncated":
        path.write_bytes(good[:-5])
    elif damage == "not json":
        path.write_bytes(good.split(b"\n")[0] + b"\n{not json")
    elif damage == "not utf-8":
        path.write_bytes(good.replace(b"/srv/borg", b"/srv/\xff"))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other text's entry":  # a valid entry, but for another text
        path.write_bytes(entry_path(cache, other).read_bytes())
    elif damage == "wrong header":
        path.write_bytes(good.replace(b"parsed config 1", b"parsed config 0", 1))
    elif damage == "a directory":
        path.mkdir()
    elif damage == "a symlink":
        path.symlink_to(entry_path(cache, other))
    if not path.is_dir():
        os.chmod(path, 0o600, follow_symlinks=False) if not path.is_symlink() else None
    assert config_cache.parsed_document(TEXT, cache) == (False, None)
    assert config.parse_config_text(TEXT, "c.yaml", cache) == config.load_yaml(TEXT)
    if damage != "a directory":  # replaced by a good entry (rename cannot replace a directory)
        assert config_cache.parsed_document(TEXT, cache) == (True, config.load_yaml(TEXT))


def test_an_entry_writable_by_others_or_owned_by_another_user_is_ignored(cache):
    config.parse_config_text(TEXT, "c.yaml", cache)
    path = entry_path(cache)
    assert config_cache.parsed_document(TEXT, cache)[0]
    for mode in (0o620, 0o602, 0o640, 0o666):
        os.chmod(path, mode)
        assert config_cache.parsed_document(TEXT, cache) == (False, None), oct(mode)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:  # as root: an entry written by a non-root user (here: nobody) is not ours
        os.chown(path, 65534, 65534)
        assert config_cache.parsed_document(TEXT, cache) == (False, None)
        os.chown(path, 0, 0)
    assert config_cache.parsed_document(TEXT, cache)[0]


def test_a_cache_directory_open_to_others_or_not_ours_is_neither_read_nor_written(cache, tmp_path):
    config.parse_config_text(TEXT, "c.yaml", cache)
    os.chmod(cache, 0o755)
    assert config_cache.parsed_document(TEXT, cache) == (False, None)
    os.chmod(cache, 0o700)
    os.chmod(cache.parent, 0o777)  # the parent (/run/kvm-borg) open to others: nothing is trusted
    assert config_cache.parsed_document(TEXT, cache) == (False, None)
    other = tmp_path / "run" / "other"
    config_cache.remember_document(TEXT, {"a": 1}, other)
    assert not other.exists()
    os.chmod(cache.parent, 0o700)
    if os.geteuid() == 0:
        os.chown(cache, 65534, 65534)
        assert config_cache.parsed_document(TEXT, cache) == (False, None)
        os.chown(cache, 0, 0)
    assert config_cache.parsed_document(TEXT, cache)[0]


def test_a_document_json_cannot_keep_exactly_is_not_remembered_and_still_parsed_right(cache):
    for text in ("1: one\n", "when: 2026-12-01\n", "? [a, b]\n: x\n", "true: yes\n",
                 "a: &x {k: v}\nb: *x\n"):  # an alias: one object twice (JSON would make two)
        document = config.parse_config_text(text, "c.yaml", cache)
        assert document == config.load_yaml(text)
        assert not config_cache.json_exact(document)
    assert not cache.exists() or list(cache.iterdir()) == []
    for _ in range(2):  # a cycle (JSON would loop forever): parsed, the same way, every time
        document = config.parse_config_text("a: &x [1, *x]\n", "c.yaml", cache)
        assert document["a"][0] == 1 and document["a"][1] is document["a"]
    assert not cache.exists() or list(cache.iterdir()) == []


def test_malformed_yaml_is_the_same_one_line_error_every_time_and_never_cached(cache):
    for _ in range(2):
        with pytest.raises(ConfigError, match=r"^c.yaml: duplicate key 'a' at line 2"):
            config.parse_config_text("a: 1\na: 2\n", "c.yaml", cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_cached_document_is_validated_like_a_parsed_one(cache, monkeypatch):
    bad = "repositories: [{name: a, type: borg}]\n"
    config.parse_config_text(bad, "c.yaml", cache)
    no_parser(monkeypatch)
    with pytest.raises(ConfigError, match=r"^repositories\[0\].path: required$"):
        config.validate(config.parse_config_text(bad, "c.yaml", cache))


def test_the_oldest_entries_beyond_keep_are_removed_when_a_new_one_is_written(cache, monkeypatch):
    monkeypatch.setattr(config_cache, "KEEP", 3)
    texts = [TEXT + f"# edit {n}\n" for n in range(5)]
    for n, text in enumerate(texts):
        config_cache.remember_document(text, {"n": n}, cache)
        os.utime(entry_path(cache, text), (1000 + n, 1000 + n))  # a clear order, whatever the clock's resolution
    config_cache.remember_document(TEXT, {"n": "new"}, cache)
    kept = sorted(path.name for path in cache.iterdir())
    assert kept == sorted([config_cache.text_digest(TEXT), config_cache.text_digest(texts[4]),
                           config_cache.text_digest(texts[3])])
    assert config_cache.parsed_document(texts[4], cache) == (True, {"n": 4})
    assert config_cache.parsed_document(texts[0], cache) == (False, None)  # pruned: parsed again next time


def test_validation_markers_are_pruned_the_same_way(tmp_path):
    (tmp_path / "run").mkdir(mode=0o700)
    directory = tmp_path / "run" / "validated"
    for n in range(6):
        config_cache.remember(f"{n:064x}", directory)
        os.utime(directory / f"{n:064x}", (1000 + n, 1000 + n))
    config_cache.prune(directory, keep=2)
    assert sorted(p.name for p in directory.iterdir()) == [f"{4:064x}", f"{5:064x}"]
    assert config_cache.oldest_beyond([(3.0, "c"), (1.0, "a"), (2.0, "b")], 1) == ["b", "a"]
