"""Short tool calls (qemu-img, mount, umount, partx, blkid, losetup, qemu-storage-daemon): the one place
that runs them.

A tool call here is short and carries no secret: it gets no stdin, its output is captured whole,
and it has a timeout. A failure is one ToolError naming the tool and the first line of its stderr.
Long-running children with secrets, progress or a parent-death signal (borg, restic) go through
`kvm_borg.execute.run_command` instead.

A plain `subprocess.run` wrapper rather than `sh`: importing sh costs ~140 ms of start-up (the
fixed cost of a backup is measured), and nothing here needs more than argv in, text out.
"""

from __future__ import annotations

import subprocess

from kvm_borg.errors import KvmBorgError
from kvm_borg.execute import with_child_priority

DEFAULT_TIMEOUT = 120.0
# Installation hints for a missing tool, by its name.
PACKAGES = {"qemu-img": "qemu-utils"}


class ToolError(KvmBorgError):
    """A short tool call failed: not found, timed out, or exited with an unexpected status."""

    def __init__(self, tool: str, detail: str, what: str | None = None):
        self.tool = tool
        self.detail = detail
        super().__init__(f"cannot {what}: {tool}: {detail}" if what else f"{tool}: {detail}")


def first_line(text: str) -> str | None:
    """Given a tool's stderr (or stdout), return its first non-blank line stripped, or None."""
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


def run_tool(argv: list[str] | tuple[str, ...], *, what: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
             ok_codes: tuple[int, ...] | None = (0,), pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    """Given an argv, what the call is for (for the message), a timeout in seconds (None: none), the exit
    codes that count as success (None: any) and file descriptors the tool inherits (it names them
    /dev/fd/N), run it without stdin at the children's priority (config `nice:`/`ionice:`); return the CompletedProcess (text stdout and stderr). A missing
    tool, a timeout or another exit code is a ToolError."""
    tool = argv[0]
    try:
        proc = subprocess.run(list(with_child_priority(argv)), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
                              pass_fds=pass_fds)
    except FileNotFoundError:
        package = PACKAGES.get(tool)
        raise ToolError(tool, "not found" + (f": install {package}" if package else ""), what) from None
    except subprocess.TimeoutExpired:
        raise ToolError(tool, f"no answer within {timeout:g}s", what) from None
    if ok_codes is not None and proc.returncode not in ok_codes:
        raise ToolError(tool, first_line(proc.stderr) or f"exited {proc.returncode}", what)
    return proc


def tool_output(argv: list[str] | tuple[str, ...], *, what: str | None = None,
                timeout: float | None = DEFAULT_TIMEOUT) -> str:
    """Given an argv and what it is for, run it (see run_tool) and return its stdout."""
    return run_tool(argv, what=what, timeout=timeout).stdout
