"""kvm_borg.entry_points: the `kvm_borg` group read from installed distributions' entry_points.txt."""

from __future__ import annotations

import importlib.metadata

import pytest

from kvm_borg import entry_points
from kvm_borg.errors import ConfigError
from kvm_borg.plugins import PluginManager, load_entry_point_plugins
from kvm_borg import hookspecs


def test_parse_takes_the_group_only_keeps_case_and_drops_extras():
    text = "[console_scripts]\nx = a:b\n[kvm_borg]\nNotify = my.mod:plugin [extra]\nplain=my.other\n"
    found = entry_points.parse(text, "kvm_borg", "f")
    assert [(e.name, e.value) for e in found] == [("Notify", "my.mod:plugin"), ("plain", "my.other")]
    assert entry_points.parse("not an ini [", "kvm_borg", "f") == []
    assert entry_points.parse("[other]\na = b\n", "kvm_borg", "f") == []


def test_find_reads_dist_info_and_egg_info_first_name_wins(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for base, dist, value in ((first, "one-1.0.dist-info", "mod_one"), (second, "two.egg-info", "mod_two")):
        (base / dist).mkdir(parents=True)
        (base / dist / "entry_points.txt").write_text(f"[kvm_borg]\nsame = {value}\n{value} = {value}:x\n")
    (first / "nometa-1.0.dist-info").mkdir()
    found = entry_points.find("kvm_borg", [str(first), str(tmp_path / "missing"), str(second)])
    assert [(e.name, e.value) for e in found] == [("same", "mod_one"), ("mod_one", "mod_one:x"),
                                                 ("mod_two", "mod_two:x")]


def test_find_agrees_with_importlib_metadata_on_this_venv():
    ours = {(e.name, e.value) for e in entry_points.find("console_scripts")}
    theirs = {(e.name, e.value.split("[")[0].strip()) for e in importlib.metadata.entry_points(group="console_scripts")}
    assert ours == theirs and ours


def test_load_resolves_attributes_and_a_broken_entry_point_is_one_config_error(tmp_path):
    assert entry_points.load(entry_points.EntryPoint("x", "os.path:join", "f")) is __import__("os").path.join
    dist = tmp_path / "bad-1.0.dist-info"
    dist.mkdir()
    (dist / "entry_points.txt").write_text("[kvm_borg]\nbroken = no_such_module_kb:plugin\n")
    pm = PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    with pytest.raises(ConfigError, match=r"entry point broken = no_such_module_kb:plugin .*bad-1.0.dist-info"):
        load_entry_point_plugins(pm, [str(tmp_path)])
