"""`kvm-borg doctor`'s row for the bitmap method: ok when it can run; when it cannot, a warning only
if the configuration asks for it."""

from types import SimpleNamespace

from kvm_borg.actions.doctor import bitmap_method_check, import_problem


def _settings(method="snapshot", domains_method=None):
    return SimpleNamespace(method=method, domains_method=domains_method or {})


def test_a_method_that_can_run_is_ok():
    assert bitmap_method_check(_settings("bitmap"), []) == (
        "bitmap method", "ok", "can run (libnbd, pyfuse3, libvirt backup jobs)")


def test_a_method_that_cannot_run_warns_only_when_configured():
    problems = ["nbd does not import (...)", "libvirtd 7.0.0 predates 7.6.0 (incremental backup not enabled)"]
    for settings in (_settings("bitmap"), _settings("auto"), _settings("snapshot", {"db-*": "bitmap"})):
        check, status, detail = bitmap_method_check(settings, problems)
        assert status == "warning" and detail == "cannot run: " + "; ".join(problems)
    check, status, detail = bitmap_method_check(_settings("snapshot", {"web": "snapshot"}), problems)
    assert status == "ok" and detail.endswith("(not configured: method is snapshot)")


def test_import_problem_names_the_module_and_what_provides_it():
    assert import_problem("json", "the standard library") is None
    problem = import_problem("kvm_borg_no_such_module", "install it")
    assert problem.startswith("kvm_borg_no_such_module does not import (ModuleNotFoundError:")
    assert problem.endswith("; install it)")
