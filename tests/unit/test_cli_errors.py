"""kvm_borg.cli: an exception escaping an action is one line and exit 2, never a traceback (unless asked)."""

from __future__ import annotations

import subprocess
import sys

import libvirt
import pytest

from kvm_borg import cli
from kvm_borg.errors import UsageError


def _libvirt_error(message: str) -> libvirt.libvirtError:
    """Return a real libvirt.libvirtError carrying libvirt's own error record for `message`."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # keep libvirt from printing to stderr
    conn = libvirt.open("test:///default")  # libvirt's built-in test driver: no daemon, no host state
    try:
        conn.lookupByName(message)
    except libvirt.libvirtError as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("the test driver found a domain that does not exist")


class libvirtError(Exception):  # noqa: N801 - the name is what the CLI recognises
    """A class shaped like libvirt's, in another module: must not be taken for libvirt's."""


def test_a_libvirt_error_becomes_libvirts_one_line_message():
    exc = _libvirt_error("kbtest-no-such-domain")
    assert exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert cli.libvirt_error_message(exc) == "Domain not found"  # the test driver's wording
    assert cli.error_line(exc) == "kvm-borg: error: Domain not found"


def test_a_libvirt_error_subclass_and_a_multi_line_message_are_one_line():
    class Sub(libvirt.libvirtError):
        pass

    exc = Sub("first line\nsecond  line")
    assert cli.libvirt_error_message(exc) is not None
    assert "\n" not in cli.error_line(exc)


def test_other_exceptions_are_not_taken_for_libvirt_errors_and_name_their_type():
    assert cli.libvirt_error_message(libvirtError("look-alike")) is None
    assert cli.libvirt_error_message(ValueError("x")) is None
    assert cli.error_line(ZeroDivisionError("division by zero")) == (
        "kvm-borg: error: unexpected ZeroDivisionError: division by zero (run with --debug for the traceback)")
    assert cli.error_line(RuntimeError()) == "kvm-borg: error: unexpected RuntimeError (run with --debug for the traceback)"


@pytest.mark.parametrize("raised, expected", [
    (lambda: _libvirt_error("kbtest-gone"), "kvm-borg: error: Domain not found"),
    (lambda: KeyError("meta"), "kvm-borg: error: unexpected KeyError: 'meta' (run with --debug for the traceback)"),
])
def test_main_prints_one_line_and_exits_2_and_the_traceback_only_with_debug(monkeypatch, capsys, raised, expected):
    exc = raised()

    def failing_run(_args):
        raise exc

    monkeypatch.setattr(cli, "_run", failing_run)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert err == expected + "\n"
    for flag in ("--debug", "-v"):
        assert cli.main([flag, "list"]) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.rstrip().endswith(expected)


def test_kvm_borg_errors_keep_their_message_and_exit_code(monkeypatch, capsys):
    def failing_run(_args):
        raise UsageError("bad value")

    monkeypatch.setattr(cli, "_run", failing_run)
    assert cli.main(["list"]) == 2
    assert capsys.readouterr().err == "kvm-borg: error: bad value\n"


def test_importing_the_cli_does_not_import_libvirt():
    code = "import sys, kvm_borg.cli; sys.exit('libvirt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_kvm_borg_process_exits_with_mains_code_and_its_one_line():
    code = "import sys; from kvm_borg.cli import console_main; sys.argv = ['kvm-borg', *sys.argv[1:]]; console_main()"
    proc = subprocess.run([sys.executable, "-c", code, "--config", "/nonexistent/config.yaml", "list"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "kvm-borg: error: /nonexistent/config.yaml: config file does not exist\n"
    proc = subprocess.run([sys.executable, "-c", code, "config", "generate"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("# kvm-borg configuration")


def test_the_debug_traceback_is_redacted_like_every_other_line(monkeypatch, capsys):
    def failing_run(_args):
        raise RuntimeError("cannot open rest:https://fleet:s3cret@backup.example.org/repo")

    monkeypatch.setattr(cli, "_run", failing_run)
    assert cli.main(["--debug", "list"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "fleet:***@backup.example.org" in err
    assert "s3cret" not in err
