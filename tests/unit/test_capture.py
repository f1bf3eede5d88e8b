"""engine/capture.py: version formatting, the XML flags, and libvirt errors coming out as EngineError."""

from types import SimpleNamespace

import libvirt
import pytest

from kvm_borg.engine.capture import capture_domain, is_active, xml_flags
from kvm_borg.engine.versions import dotted_version
from kvm_borg.errors import EngineError, KvmBorgError


def test_libvirt_version_numbers_are_dotted():
    assert dotted_version(9_000_000) == "9.0.0" and dotted_version(7_002_015) == "7.2.15"


def test_definitions_are_read_with_secrets_and_the_persistent_one_inactive():
    assert xml_flags(inactive=True) == libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE
    assert xml_flags(inactive=False) == libvirt.VIR_DOMAIN_XML_SECURE


class Dom:
    def __init__(self, fail: bool = False):
        self.fail, self.flags = fail, []

    def isPersistent(self):  # noqa: N802 (libvirt's names)
        return 0

    def isActive(self):  # noqa: N802
        if self.fail:
            exc = libvirt.libvirtError("gone")
            exc.err = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "Domain not found", 2, None, None, None, 0, 0)
            raise exc
        return 1

    def XMLDesc(self, flags):  # noqa: N802
        self.flags.append(flags)
        return f"<domain flags='{flags}'/>"


def handle(dom):
    conn = SimpleNamespace(getLibVersion=lambda: 9_000_000, getVersion=lambda: 7_002_000)
    return SimpleNamespace(dom=dom, uuid="u-1", connection=SimpleNamespace(conn=conn))


def test_a_running_domain_is_captured_with_both_definitions_and_the_versions():
    dom = Dom()
    captured = capture_domain(handle(dom), running=True)
    assert captured.persistent is False and captured.live_xml is not None
    assert (captured.libvirt_version, captured.qemu_version) == ("9.0.0", "7.2.0")
    assert dom.flags == [xml_flags(inactive=True), xml_flags(inactive=False)]


def test_a_shut_off_domain_has_no_live_definition():
    dom = Dom()
    assert capture_domain(handle(dom), running=False).live_xml is None and dom.flags == [xml_flags(inactive=True)]


def test_a_libvirt_error_comes_out_as_an_engine_error():
    with pytest.raises(EngineError) as raised:
        is_active(handle(Dom(fail=True)))
    assert str(raised.value) == "libvirt: Domain not found" and isinstance(raised.value, KvmBorgError)
    assert isinstance(raised.value.__cause__, libvirt.libvirtError)
