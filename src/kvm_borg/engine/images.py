"""qemu-img calls: image facts and offline commit. The only place that runs qemu-img."""

from __future__ import annotations

import json
import os
import stat

import sh

from kvm_borg.errors import KvmBorgError

qemu_img = sh.Command("qemu-img")


def _run(*args: str) -> str:
    try:
        return str(qemu_img(*args))
    except sh.ErrorReturnCode as exc:
        message = exc.stderr.decode(errors="replace").strip().splitlines()
        raise KvmBorgError(f"qemu-img {args[0]} failed: {message[-1] if message else exc.exit_code}") from None
    except sh.CommandNotFound:
        raise KvmBorgError("qemu-img not found: install qemu-utils") from None


def image_info(path: str, fmt: str | None = None) -> dict:
    """Given an image path (in use or not), return `qemu-img info` as a dict (force-shared read)."""
    args = ["info", "-U", "--output=json"] + (["-f", fmt] if fmt else []) + [path]
    return json.loads(_run(*args))


def backing_chain(path: str, fmt: str | None = None) -> list[dict]:
    """Given an image path, return `qemu-img info --backing-chain` entries, top first."""
    args = ["info", "-U", "--backing-chain", "--output=json"] + (["-f", fmt] if fmt else []) + [path]
    data = json.loads(_run(*args))
    return data if isinstance(data, list) else [data]


def commit_offline(overlay: str) -> None:
    """Given an overlay no process has open, write its data into its backing file (`qemu-img commit`)."""
    _run("commit", "-f", "qcow2", "-d", overlay)


def top_layer_has_data(overlay: str) -> bool:
    """Given a qcow2 overlay, return whether any cluster is allocated in the overlay itself."""
    extents = json.loads(_run("map", "-U", "--output=json", "-f", "qcow2", overlay))
    return any(e.get("depth", 0) == 0 and e.get("data") for e in extents)


def is_block_device(path: str) -> bool:
    """Given a path, return whether it is (or links to) a block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def block_device_size(path: str) -> int:
    """Given a block device path, return its size in bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
