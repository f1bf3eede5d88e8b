"""qemu-img calls of a backup: image facts and offline commit (through kvm_borg.tools)."""

from __future__ import annotations

import json
import os
import stat

from kvm_borg.tools import tool_output


def qemu_img_argv(*args: str) -> list[str]:
    """Given qemu-img's arguments, return its argv."""
    return ["qemu-img", *args]


def backing_chain_argv(path: str, fmt: str | None = None) -> list[str]:
    """Given an image path and its format (None: probed), return the `qemu-img info --backing-chain` argv
    (force-shared: the image may be in use)."""
    return qemu_img_argv("info", "-U", "--backing-chain", "--output=json", *(["-f", fmt] if fmt else []), path)


def backing_chain(path: str, fmt: str | None = None) -> list[dict]:
    """Given an image path, return `qemu-img info --backing-chain` entries, top first."""
    data = json.loads(tool_output(backing_chain_argv(path, fmt), what=f"read the backing chain of {path}"))
    return data if isinstance(data, list) else [data]


def qcow2_compat(path: str) -> str | None:
    """Given a qcow2 image path, return its compat level ("1.1" = v3, "0.10" = v2), or None when unreadable."""
    try:
        top = backing_chain(path, "qcow2")[0]
    except Exception:  # unreadable: the caller treats the disk as unable to hold a bitmap
        return None
    compat = ((top.get("format-specific") or {}).get("data") or {}).get("compat")
    return compat if isinstance(compat, str) else None


def commit_offline(overlay: str) -> None:
    """Given an overlay no process has open, write its data into its backing file (`qemu-img commit`)."""
    tool_output(qemu_img_argv("commit", "-f", "qcow2", "-d", overlay), what=f"commit {overlay}", timeout=None)


def is_block_device(path: str) -> bool:
    """Given a path, return whether it is (or links to) a block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
