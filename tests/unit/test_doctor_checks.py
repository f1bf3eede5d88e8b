"""`kvm-borg doctor`'s row for the bitmap method: ok when it can run; when it cannot, a warning only
if the configuration insists on it (`auto` falls back to snapshot)."""

import shutil
from types import SimpleNamespace

from kvm_borg.actions.doctor import bitmap_method_check, bitmap_wanted, import_problem, scratch_check


def _settings(method="snapshot", domains_method=None):
    return SimpleNamespace(method=method, domains_method=domains_method or {})


def test_a_method_that_can_run_is_ok():
    assert bitmap_method_check(_settings("bitmap"), []) == (
        "bitmap method", "ok", "can run (libnbd, pyfuse3, libvirt backup jobs)")


def test_a_method_that_cannot_run_warns_only_when_configured():
    problems = ["nbd does not import (...)", "libvirtd 7.0.0 predates 7.6.0 (incremental backup not enabled)"]
    for settings in (_settings("bitmap"), _settings("snapshot", {"db-*": "bitmap"})):
        check, status, detail = bitmap_method_check(settings, problems)
        assert status == "warning" and detail == "cannot run: " + "; ".join(problems)
    check, status, detail = bitmap_method_check(_settings("snapshot", {"web": "snapshot"}), problems)
    assert status == "ok" and detail.endswith("(not configured: method is snapshot)")
    for settings in (_settings("auto"), _settings("snapshot", {"web": "auto"})):
        check, status, detail = bitmap_method_check(settings, problems)
        assert status == "ok" and detail.endswith("(method auto backs up with snapshot instead)")


def test_import_problem_names_the_module_and_what_provides_it():
    assert import_problem("json", "the standard library") is None
    problem = import_problem("kvm_borg_no_such_module", "install it")
    assert problem.startswith("kvm_borg_no_such_module does not import (ModuleNotFoundError:")
    assert problem.endswith("; install it)")


def test_bitmap_wanted_by_method_or_any_domain():
    assert not bitmap_wanted(_settings()) and not bitmap_wanted(_settings("snapshot", {"web": "snapshot"}))
    assert bitmap_wanted(_settings("bitmap")) and bitmap_wanted(_settings("snapshot", {"db": "bitmap"}))
    assert not bitmap_wanted(_settings("auto"))


def test_scratch_dir_free_space_against_scratch_min_free(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    missing = tmp_path / "state" / "scratch"
    check, status, detail = scratch_check(SimpleNamespace(scratch_dir=missing, scratch_min_free=2**20))
    assert (check, status) == ("scratch_dir", "ok") and detail.startswith(f"{missing} (")
    assert "created on first bitmap backup" in detail
    check, status, detail = scratch_check(SimpleNamespace(scratch_dir=tmp_path, scratch_min_free=free + 2**40))
    assert status == "warning" and "created" not in detail and "MiB free" in detail
