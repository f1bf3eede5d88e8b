"""`python -m kvm_borg.segment_view SPEC.json`: mount the view the spec describes and serve it.

A process of its own (it outlives `kvm-borg freeze --expose`), never a thread of kvm-borg.
Beside the spec it writes `<spec>.status` once: `ready <pid>` after the mount is live, or
`error: <one line>` when it could not start (exit 2). While it serves it rewrites `stats.json`
(renamed into place, not fsync'd) every PROGRESS_SECONDS the counts changed, `"clean": false`; it
serves until SIGTERM/SIGINT/SIGHUP or an unmount, then unmounts and writes `stats.json` (atomic,
fsync'd) once more: `{"clean": true, "disks": {target: {"bytes_read": N}}}`. Its log goes to stderr
(control.start_view points that at `view.log`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from kvm_borg import atomic, mountinfo
from kvm_borg.segment_view import spec as view_spec

logger = logging.getLogger("kvm_borg.segment_view")


def mount_options(spec: view_spec.ViewSpec) -> set[str]:
    """Given a spec, return the FUSE mount options: read-only, our fsname/subtype (stop_leftover checks
    it), allow_other when asked, permissions checked by the kernel."""
    options = {"ro", "default_permissions", f"fsname={view_spec.FS_SUBTYPE}", f"subtype={view_spec.FS_SUBTYPE}"}
    if spec.allow_other:
        options.add("allow_other")
    return options


def stats_json(view, clean: bool) -> bytes:
    """Given a view and whether it stopped cleanly, return the bytes of its stats.json."""
    disks = {target: {"bytes_read": n} for target, n in view.bytes_read.items()}
    return json.dumps({"clean": clean, "disks": disks}, sort_keys=True).encode()


def _write_progress(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.progress")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        atomic.write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(temp, path)


def bdi_read_ahead_path(st_dev: int) -> str:
    """Given the st_dev of a FUSE mount, return its backing device's read_ahead_kb file in sysfs."""
    return f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"


def _raise_read_ahead(mountpoint: str) -> None:
    try:
        with open(bdi_read_ahead_path(os.stat(mountpoint).st_dev), "w") as handle:
            handle.write(str(READ_AHEAD_KB))
    except OSError as exc:  # slower, still correct
        logger.warning("cannot raise the readahead of %s: %s", mountpoint, exc)


def _report(spec_path: Path, text: str) -> None:
    atomic.write_atomic(view_spec.status_path(spec_path), (text + "\n").encode(), 0o600)


def _load(spec_path: Path) -> view_spec.ViewSpec:
    try:
        data = json.loads(spec_path.read_bytes())
    except OSError as exc:
        raise view_spec.SpecError(f"cannot read {spec_path}: {exc.strerror}") from None
    except ValueError as exc:
        raise view_spec.SpecError(f"{spec_path} is not JSON: {exc}") from None
    return view_spec.parse(data)


def _check_mountpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise view_spec.SpecError(f"mount point {path} is not a directory")
    if mountinfo.entry_at(os.path.realpath(path)) is not None:
        raise view_spec.SpecError(f"something is already mounted on {path}")


PROGRESS_SECONDS = 0.5
#: Readahead of the view's own mount (the kernel default is 128 KiB): a sequential reader (borg,
#: restic) then has a whole 4 MiB segment of requests in flight (1 MiB each) instead of 128-256 KiB.
#: Measured: 1 MiB halved borg's time through the view on a loaded host (the view's commit); 4 MiB
#: took an idle `borg create` of 4.4 GiB of 4 MiB segments from 47 s to 44 s (16 MiB: 43 s).
READ_AHEAD_KB = 4096
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_early_signals: list[int] = []


def _remember_signal(signum, _frame) -> None:
    _early_signals.append(signum)


async def _serve(pyfuse3, trio, view, spec_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        view.nursery = nursery

        async def write_progress():
            written = None
            while True:
                await trio.sleep(PROGRESS_SECONDS)
                counts = dict(view.bytes_read)
                if counts != written:
                    try:
                        _write_progress(view_spec.stats_path(spec_path), stats_json(view, False))
                    except OSError as exc:
                        logger.warning("cannot write progress: %s", exc)
                    written = counts

        nursery.start_soon(write_progress)

        async def when_serving():
            # stat() of our own mount needs the loop that serves it: from a thread, once it runs.
            await trio.to_thread.run_sync(_raise_read_ahead, view.spec.mountpoint, abandon_on_cancel=True)
            _report(spec_path, f"ready {os.getpid()}")

        nursery.start_soon(when_serving)

        async def watch_signals():
            with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
                if _early_signals:  # came during start-up, before this receiver existed
                    logger.info("signal %d during start-up: unmounting", _early_signals[0])
                    pyfuse3.terminate()
                    return
                async for signum in signals:
                    logger.info("signal %d: unmounting", signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        await pyfuse3.main(min_tasks=2, max_tasks=32)
        nursery.cancel_scope.cancel()


def serve(spec_path: Path) -> int:
    """Given the spec's path, mount and serve the view; return the exit code (0 after a clean stop,
    2 when it could not start: the reason is in the status file and on stderr)."""
    try:
        import pyfuse3
        import trio

        from kvm_borg.segment_view.fs import make_view

        spec = _load(spec_path)
        _check_mountpoint(spec.mountpoint)
        view = make_view(spec)
        view.check()
    except Exception as exc:  # every start failure becomes the one line the parent shows
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.error("cannot start: %s", message)
        _report(spec_path, f"error: {message}")
        return 2
    try:
        pyfuse3.init(view, spec.mountpoint, mount_options(spec))
    except Exception as exc:
        view.close()
        logger.error("cannot mount %s: %s", spec.mountpoint, exc)
        _report(spec_path, f"error: cannot mount {spec.mountpoint}: {exc}")
        return 2
    clean = False
    try:
        trio.run(_serve, pyfuse3, trio, view, spec_path)
        clean = True
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            view.close()
            atomic.write_atomic(view_spec.stats_path(spec_path), stats_json(view, clean), 0o600)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s segment_view[%(process)d] %(levelname)s %(message)s")
    if len(args) != 1:
        print("usage: python -m kvm_borg.segment_view SPEC.json", file=sys.stderr)
        return 2
    # A stop signal during start-up is kept and acted on once the loop runs (never a mount left
    # behind by a process killed between mount and loop).
    for signum in STOP_SIGNALS:
        signal.signal(signum, _remember_signal)
    return serve(Path(args[0]).absolute())


if __name__ == "__main__":
    sys.exit(main())
