"""Which method backs up a domain: configured per domain by name or glob; `auto` takes the bitmap
method only for a running domain with a qcow2 v3 disk."""

import pytest

from kvm_borg.method_choice import choose_method, configured_method

QCOW2_V3, QCOW2_V2, RAW = ("qcow2", "1.1"), ("qcow2", "0.10"), ("raw", None)


@pytest.mark.parametrize("running, disks, method", [
    (True, [QCOW2_V3], "bitmap"),
    (True, [RAW, QCOW2_V3], "bitmap"),  # one qcow2 v3 disk suffices; the raw one is read in full
    (True, [QCOW2_V2], "snapshot"),  # v2 (compat 0.10) cannot hold bitmaps
    (True, [RAW], "snapshot"),
    (True, [("qcow2", None)], "snapshot"),  # compat unknown: not trusted
    (True, [], "snapshot"),
    (False, [QCOW2_V3], "snapshot"),  # shut off
])
def test_auto(running, disks, method):
    assert choose_method("auto", {}, "web", running, disks) == method


def test_an_explicit_method_is_taken_as_it_is():
    for method in ("snapshot", "bitmap"):
        assert choose_method(method, {}, "web", True, [QCOW2_V3]) == method
        assert choose_method(method, {}, "web", False, [RAW]) == method


def test_domains_method_by_exact_name_then_first_matching_glob():
    per_domain = {"db-*": "bitmap", "db-legacy": "snapshot", "*": "auto"}
    assert configured_method("snapshot", per_domain, "db-legacy") == "snapshot"  # exact name wins
    assert configured_method("snapshot", per_domain, "db-main") == "bitmap"
    assert configured_method("snapshot", per_domain, "web") == "auto"
    assert configured_method("bitmap", {"db-*": "snapshot"}, "web") == "bitmap"
    assert configured_method("snapshot", {"DB-*": "bitmap"}, "db-main") == "snapshot"  # case matters
    assert choose_method("snapshot", per_domain, "web", True, [QCOW2_V3]) == "bitmap"
    assert choose_method("snapshot", per_domain, "web", False, [QCOW2_V3]) == "snapshot"
    assert choose_method("bitmap", per_domain, "db-legacy", True, [QCOW2_V3]) == "snapshot"


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        choose_method("fast", {}, "web", True, [QCOW2_V3])


def test_missing_bitmap_modules_names_each_module_and_its_source():
    from kvm_borg.method_choice import BITMAP_MODULES, missing_bitmap_modules
    assert missing_bitmap_modules(lambda name: object()) == []
    missing = missing_bitmap_modules(lambda name: None if name == "nbd" else object())
    assert missing == [f"no module nbd ({BITMAP_MODULES['nbd']})"]
