"""kvm_borg.tools: short tool calls, run for real (sh, a missing binary): one ToolError naming the tool and
the first line of its stderr."""

from __future__ import annotations

import pytest

from kvm_borg.errors import KvmBorgError
from kvm_borg.tools import ToolError, first_line, run_tool, tool_output


def test_output_is_returned_and_stdin_is_empty():
    assert tool_output(["sh", "-c", "cat; echo out"]) == "out\n"


def test_a_failure_names_the_tool_what_it_was_for_and_its_stderrs_first_line():
    with pytest.raises(ToolError) as caught:
        run_tool(["sh", "-c", "echo >&2; echo 'first problem' >&2; echo 'hint' >&2; exit 3"], what="mount vda1")
    assert str(caught.value) == "cannot mount vda1: sh: first problem"
    assert isinstance(caught.value, KvmBorgError) and caught.value.tool == "sh"


def test_a_silent_failure_says_the_exit_code():
    with pytest.raises(ToolError, match=r"^sh: exited 4$"):
        run_tool(["sh", "-c", "exit 4"])


def test_other_exit_codes_are_accepted_when_asked():
    assert run_tool(["sh", "-c", "exit 63"], ok_codes=None).returncode == 63
    assert run_tool(["sh", "-c", "exit 3"], ok_codes=(0, 3)).returncode == 3


def test_a_missing_tool_and_a_hung_one_are_tool_errors():
    with pytest.raises(ToolError, match="cannot probe: no-such-tool-kvm-borg: not found"):
        run_tool(["no-such-tool-kvm-borg"], what="probe")
    with pytest.raises(ToolError, match=r"sleep: no answer within 0.2s"):
        run_tool(["sleep", "5"], timeout=0.2)


def test_first_line_skips_blank_lines():
    assert first_line("\n  \n  one  \ntwo") == "one" and first_line(" \n") is None


def test_a_missing_qemu_img_says_which_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no qemu-img on PATH
    with pytest.raises(ToolError, match=r"^cannot rebase /x: qemu-img: not found: install qemu-utils$"):
        run_tool(["qemu-img", "rebase", "/x"], what="rebase /x")
