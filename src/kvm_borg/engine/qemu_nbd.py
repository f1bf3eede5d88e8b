"""Read-only NBD exports of a shut-off domain's images with `qemu-nbd -r` on a unix socket: the argv
(pure), starting one, stopping it, and ending one a crashed run left (recover).

Measured on QEMU 7.2: `qemu-nbd -r` holds a lock that makes a domain start fail ("Failed to get
'write' lock"); the exports open the image with `file.locking=off` instead, so the domain may start
meanwhile, as with the snapshot method's offline source, and the run is then flagged inconsistent.
`-B NAME` exports the image's persistent bitmap NAME as `qemu:dirty-bitmap:NAME`; qemu-nbd refuses
to start when it is missing ("Bitmap 'NAME' is not found") or inconsistent.
"""

from __future__ import annotations

import os
import signal
import socket as socket_module
import subprocess
import time
from pathlib import Path

from kvm_borg.errors import KvmBorgError
from kvm_borg.execute import one_line, with_child_priority, with_parent_death_signal

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def image_opts(image: str, fmt: str, block_device: bool) -> str:
    """Given an image path, its format and whether it is a block device, return qemu-nbd's --image-opts
    string opening it without image locking (commas in the path doubled, as QEMU's option syntax wants)."""
    escaped = image.replace(",", ",,")
    driver = "host_device" if block_device else "file"
    return f"driver={fmt},file.driver={driver},file.filename={escaped},file.locking=off"


def qemu_nbd_argv(image: str, fmt: str, socket: str, export: str, *, bitmap: str | None = None,
                  connections: int = 4, block_device: bool = False) -> list[str]:
    """Given an image, its format, the unix socket, the export name, a persistent bitmap to export (or
    None) and how many clients may connect at once, return the `qemu-nbd -r` argv (persistent server)."""
    argv = ["qemu-nbd", "--read-only", "--persistent", f"--shared={connections}", f"--socket={socket}",
            f"--export-name={export}"]
    if bitmap:
        argv.append(f"--bitmap={bitmap}")
    return argv + ["--image-opts", image_opts(image, fmt, block_device)]


def _connectable(path: str) -> bool:
    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def start(argv: list[str], socket: str, log_path: Path, timeout: float = START_TIMEOUT, *,
          outlive_parent: bool = False) -> subprocess.Popen:
    """Given a qemu_nbd_argv, its socket and a log file, start the server (it dies with kvm-borg unless
    `outlive_parent`: `freeze --expose`) and return it once the socket accepts connections; KvmBorgError
    with qemu-nbd's reason otherwise."""
    with open(log_path, "ab") as log:
        try:
            process = subprocess.Popen(with_child_priority(argv if outlive_parent else with_parent_death_signal(argv)),
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                                       start_new_session=outlive_parent)
        except OSError as exc:
            raise KvmBorgError(f"cannot run qemu-nbd: {exc.strerror}") from None
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if os.path.exists(socket) and _connectable(socket):
            return process
        time.sleep(0.02)
    stop(process)
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    reason = one_line(lines[-1]) if lines else f"no socket within {timeout:g}s"
    raise KvmBorgError(f"qemu-nbd could not export {argv[-1].split('file.filename=')[-1].split(',file.locking')[0]}: "
                       f"{reason}")


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """Given a started server, end it (SIGTERM, SIGKILL if it lingers) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def is_export_process(pid: int, socket: str) -> bool:
    """Given a pid and a socket path, return whether it is a qemu-nbd serving that socket."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"qemu-nbd" and f"--socket={socket}".encode() in argv


def stop_leftover(pid: int, socket: str) -> bool:
    """Given the pid and socket a journal recorded, end that qemu-nbd if it still serves that socket;
    return whether it did. Anything else of that pid is left alone."""
    if not is_export_process(pid, socket):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and is_export_process(pid, socket):
            time.sleep(0.05)
        if not is_export_process(pid, socket):
            return True
    return True
