"""`method: auto` on a host where the bitmap method cannot run backs up with snapshot (engine/planning)."""

import logging
import subprocess
from types import SimpleNamespace

import pytest

from kvm_borg.engine import planning


class FakeLibvirt:
    """The one call bitmap_problem makes on a libvirt connection: its version."""

    def __init__(self, version: int):
        self.version = version

    def getLibVersion(self):
        return self.version


def qcow2_v3(tmp_path):
    path = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", str(path), "1M"], check=True)
    return SimpleNamespace(driver_type="qcow2", source=str(path), network=None)  # a DiskPlan of a file disk


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(planning, "_BITMAP_PROBLEMS", {})


def settings(method):
    return SimpleNamespace(method=method, domains_method={})


def test_auto_picks_bitmap_where_it_can_run(tmp_path):
    connection = SimpleNamespace(uri="qemu:///a", conn=FakeLibvirt(9_000_000))
    assert planning.bitmap_problem(connection) is None
    assert planning.choose_method(settings("auto"), "web", True, [qcow2_v3(tmp_path)], connection) == "bitmap"


def test_auto_falls_back_to_snapshot_with_a_line_saying_why(tmp_path, caplog):
    connection = SimpleNamespace(uri="qemu:///old", conn=FakeLibvirt(7_000_000))
    with caplog.at_level(logging.INFO, logger=planning.log.name):
        assert planning.choose_method(settings("auto"), "web", True, [qcow2_v3(tmp_path)], connection) == "snapshot"
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("domain 'web': method auto chose snapshot: the bitmap method cannot run here (")
    assert "predates 7.6.0" in line


def test_bitmap_asked_for_explicitly_is_not_replaced(tmp_path):
    connection = SimpleNamespace(uri="qemu:///old", conn=FakeLibvirt(7_000_000))
    assert planning.choose_method(settings("bitmap"), "web", True, [qcow2_v3(tmp_path)], connection) == "bitmap"


def test_a_missing_module_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(planning.method_choice, "missing_bitmap_modules", lambda: ["no module nbd (python3-libnbd)"])
    connection = SimpleNamespace(uri="qemu:///a", conn=FakeLibvirt(9_000_000))
    assert planning.bitmap_problem(connection) == "no module nbd (python3-libnbd)"
    assert planning.choose_method(settings("auto"), "web", True, [qcow2_v3(tmp_path)], connection) == "snapshot"
