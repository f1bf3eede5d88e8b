"""The one place that runs external commands whose output streams (borg, restic).

It owns what every such run needs: the argv logged at DEBUG, secrets handed over through an
inherited pipe (never argv, environment values or files), stderr read line by line for progress
and error messages, and a child that is stopped when the caller is interrupted.

Commands run in worker threads (several repositories written at once) cannot see the main
thread's interrupt; a `ChildScope` lets the main thread stop every child those threads started
and keeps them from starting new ones. `stop_scope_after` does the same when a time limit
passes (`store_timeout`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvm_borg.priority import INHERIT, ChildPriority, priority_prefix
from kvm_borg.redact import redact_text

logger = logging.getLogger(__name__)

# Seconds a child gets after SIGTERM to clean up (borg releases its repository lock) before SIGKILL.
TERMINATE_GRACE_SECONDS = 5.0
# The pipe buffer asked for a child whose stdout is streamed (`on_stdout`): Linux's default pipe-max-size.
STREAM_PIPE_BYTES = 1 << 20
# How many stderr lines a CommandResult keeps for error messages.
STDERR_TAIL_LINES = 40
# An error message is one line; long ones are cut here.
MAX_MESSAGE_CHARS = 300

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclass
class CommandResult:
    """A finished command: its exit code, its whole stdout and its last stderr lines."""

    returncode: int
    stdout: str
    stderr_tail: list[str] = field(default_factory=list)


class CommandError(Exception):
    """A command that could not run or failed. `argv` holds no secret; `returncode` is None if it never started."""

    def __init__(self, argv: Sequence[str], returncode: int | None, message: str):
        super().__init__(message)
        self.argv = tuple(argv)
        self.returncode = returncode
        self.message = message


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Given any text, return it as one stripped line of at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def summarize_stderr(stderr_tail: Sequence[str], returncode: int | None) -> str:
    """Given a command's last stderr lines and exit code, return a short one-line message."""
    for line in reversed(stderr_tail):
        if line.strip():
            return one_line(line)
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    secret: bytes | None = None,
    secret_env: str | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
    stdin=None,
    stdout=None,
    cwd=None,
    ok_returncodes: Collection[int] | None = None,
    on_stdout: Callable[[bytes], None] | None = None,
    stop_signal: int = signal.SIGTERM,
) -> CommandResult:
    """Given an argv, run it to the end and return a CommandResult.

    `env` is the child's whole environment (None: inherit ours). `secret` reaches the child
    through an inherited pipe whose fd number goes into the variable `secret_env` (e.g.
    BORG_PASSPHRASE_FD). Each stderr line goes to `on_stderr_line` as it arrives (in the calling
    thread). `stdin` defaults to /dev/null so a child never prompts; `stdout` defaults to a pipe
    whose text lands in the result (pass a file to write it there instead, or `on_stdout` to
    receive the raw chunks as they arrive; the result's stdout is then empty). With
    `ok_returncodes`, any other exit code raises CommandError; a command that cannot start
    always does. If the calling thread gets an exception while waiting (KeyboardInterrupt, a
    signal handler's Interrupted, an error from a callback), the child is stopped
    (`stop_signal`, SIGKILL after TERMINATE_GRACE_SECONDS), reaped, and the exception re-raised.
    Inside a `ChildScope` (see there) the child is registered so another thread can stop it.
    """
    argv = tuple(os.fspath(arg) for arg in argv)
    if secret is not None and not secret_env:
        raise ValueError("a secret needs secret_env, the variable that names its file descriptor")
    logger.debug("running: %s", redact_text(shlex.join(argv)))
    scope = getattr(_thread_scope, "scope", None)
    if scope is not None and scope.stopped:
        raise CommandError(argv, None, f"{os.path.basename(argv[0])} not started: the run is being interrupted")

    process, write_fd = _spawn(
        argv, dict(os.environ if env is None else env), secret, secret_env, stop_signal,
        cwd=cwd,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        # Own session: no controlling terminal, so neither the child nor its ssh can prompt,
        # and a Ctrl-C reaches only us; we stop the child in order.
        start_new_session=True,
    )

    if scope is not None and not scope.adopt(process, stop_signal):
        _stop(process, stop_signal)
        if write_fd is not None:
            os.close(write_fd)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        raise CommandError(argv, None, f"{os.path.basename(argv[0])} stopped: the run is being interrupted")

    writer = None
    if write_fd is not None:
        writer = threading.Thread(target=_write_secret, args=(write_fd, secret), daemon=True)
        writer.start()
    try:
        stdout_bytes, tail = _collect_output(process, on_stderr_line, on_stdout)
        returncode = process.wait()
    except BaseException:
        _stop(process, stop_signal)
        raise
    finally:
        if scope is not None:
            scope.release(process)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        if writer is not None:
            writer.join(timeout=TERMINATE_GRACE_SECONDS)

    result = CommandResult(returncode, stdout_bytes.decode("utf-8", "replace"), tail)
    logger.debug("%s exited with code %s", argv[0], returncode)
    if ok_returncodes is not None and returncode not in ok_returncodes:
        raise CommandError(argv, returncode, summarize_stderr(tail, returncode))
    return result


def _secret_pipe(child_env: dict[str, str], secret: bytes | None, secret_env: str | None) -> tuple[int | None, int | None]:
    """Given the child's environment and a secret (None: none), return (read_fd, write_fd) of the pipe it will
    travel through, (None, None) without a secret; `secret_env` in `child_env` names the child's fd."""
    if secret is None:
        return None, None
    read_fd, write_fd = os.pipe()  # both non-inheritable; pass_fds opens read_fd to the child only
    child_env[secret_env] = str(read_fd)
    return read_fd, write_fd


def _write_secret(fd: int, secret: bytes) -> None:
    """Given the write end of the secret pipe, write the secret and close it (EOF for the child)."""
    try:
        view = memoryview(secret)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except OSError:
        pass  # the child exited without reading it
    finally:
        os.close(fd)


# Signals kvm-borg passes on to an attached child (see run_attached).
ATTACHED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def attached_signal_map(stop_signal: int, terminal_foreground: bool) -> dict[int, int | None]:
    """Given the child's stop signal and whether we run in a terminal's foreground process group, return
    {signal kvm-borg receives: signal to send the attached child, None: none}.

    A Ctrl-C on the terminal reaches the child itself (it shares our process group), so it is not
    sent twice; a SIGINT from elsewhere, SIGTERM and SIGHUP are passed on (the last two as the
    child's stop signal: restic releases its lock on SIGINT only)."""
    return {signal.SIGINT: None if terminal_foreground else signal.SIGINT,
            signal.SIGTERM: stop_signal, signal.SIGHUP: stop_signal}


def exit_status(returncode: int) -> int:
    """Given a Popen returncode, return it as a shell reports it: 128+N for a child ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _in_terminal_foreground() -> bool:
    """Return whether one of our standard streams is a terminal whose foreground process group is ours."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def _spawn(argv: tuple[str, ...], child_env: dict, secret: bytes | None, secret_env: str | None,
           stop_signal: int | None, **popen_args) -> tuple[subprocess.Popen, int | None]:
    """Given an argv, its environment and its secret, start it (with `stop_signal` as its parent-death
    signal; None: none) and return (process, the secret pipe's write end or None); the child's read end
    is closed here. A command that cannot start is a CommandError and leaves no fd open."""
    read_fd, write_fd = _secret_pipe(child_env, secret, secret_env)
    command = with_child_priority(argv if stop_signal is None else with_parent_death_signal(argv, stop_signal))
    try:
        process = subprocess.Popen(command, env=child_env,
                                   pass_fds=() if read_fd is None else (read_fd,), **popen_args)
    except OSError as exc:
        if write_fd is not None:
            os.close(write_fd)
        raise CommandError(argv, None, f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    finally:
        if read_fd is not None:
            os.close(read_fd)
    return process, write_fd


def run_attached(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    secret: bytes | None = None,
    secret_env: str | None = None,
    stop_signal: int = signal.SIGTERM,
) -> int:
    """Given an argv and its whole environment, run it attached to our stdin, stdout, stderr and terminal
    (interactive use: `kvm-borg borg -- mount -f ...`), wait for it and return its exit status
    (128+N when signal N ended it).

    The secret reaches the child through an inherited pipe exactly as in `run_command`. The child
    stays in our process group so it can prompt and the terminal's Ctrl-C reaches it; while it
    runs, kvm-borg passes signals on as `attached_signal_map` says, and the child gets
    `stop_signal` if kvm-borg dies. A command that cannot start is a CommandError."""
    argv = tuple(os.fspath(arg) for arg in argv)
    if secret is not None and not secret_env:
        raise ValueError("a secret needs secret_env, the variable that names its file descriptor")
    logger.debug("running attached: %s", redact_text(shlex.join(argv)))
    process, write_fd = _spawn(argv, dict(env), secret, secret_env, stop_signal)
    writer = None
    if write_fd is not None:
        writer = threading.Thread(target=_write_secret, args=(write_fd, secret), daemon=True)
        writer.start()
    forward = attached_signal_map(stop_signal, _in_terminal_foreground())

    def pass_on(signum, _frame):
        target = forward.get(signum)
        if target is not None and process.poll() is None:
            try:
                process.send_signal(target)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, pass_on) for sig in ATTACHED_SIGNALS}
    try:
        returncode = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if writer is not None:
            writer.join(timeout=TERMINATE_GRACE_SECONDS)
    logger.debug("%s exited with code %s", argv[0], returncode)
    return exit_status(returncode)


def start_detached(argv: Sequence[str], *, env: Mapping[str, str], output) -> subprocess.Popen:
    """Given an argv, its whole environment and an open file for its stdout and stderr, start it in a session
    of its own with stdin from /dev/null and return the running process, not waiting for it.

    For a server meant to outlive kvm-borg (`restic mount`'s FUSE process, which `kvm-borg umount`
    ends): unlike `run_command` it gets no parent-death signal. A command that cannot start is a
    CommandError."""
    argv = tuple(os.fspath(arg) for arg in argv)
    logger.debug("starting detached: %s", redact_text(shlex.join(argv)))
    process, _ = _spawn(argv, dict(env), None, None, None, stdin=subprocess.DEVNULL, stdout=output,
                        stderr=output, start_new_session=True)
    return process


SETPRIV = shutil.which("setpriv")


def with_parent_death_signal(argv: Sequence[str], stop_signal: int = signal.SIGTERM) -> tuple[str, ...]:
    """Given a command, return it wrapped so the child gets `stop_signal` if kvm-borg dies (SIGKILL, crash).

    A borg left running after its parent was killed would keep reading a base image that
    `kvm-borg recover` is merging an overlay into. util-linux `setpriv --pdeathsig` sets the
    signal and execs the command (no preexec_fn in a threaded program)."""
    if not SETPRIV or not shutil.which(argv[0]):  # a missing binary must still fail as OSError
        return tuple(argv)
    return (SETPRIV, "--pdeathsig", signal.Signals(stop_signal).name.removeprefix("SIG"), "--", *argv)


NICE = shutil.which("nice")
IONICE = shutil.which("ionice")
_child_priority: ChildPriority = INHERIT


def set_child_priority(priority: ChildPriority) -> None:
    """Given the config's ChildPriority, make it the one every child started from now on gets (the CLI calls
    this once, after loading the config; the default is INHERIT: children get kvm-borg's own)."""
    global _child_priority
    _child_priority = priority


def with_child_priority(argv: Sequence[str], priority: ChildPriority | None = None) -> tuple[str, ...]:
    """Given a command (and a ChildPriority; None: the one set_child_priority set), return it prefixed with
    `nice`/`ionice` so the child and everything it starts run at that CPU and I/O priority (see
    kvm_borg.priority for why a wrapper). Unchanged when nothing is set, or when the command or a
    wrapper is not found (a missing binary must still fail as OSError)."""
    priority = _child_priority if priority is None else priority
    if priority.inherited or not shutil.which(argv[0]):
        return tuple(argv)
    if (priority.nice is not None and not NICE) or (priority.ionice_class is not None and not IONICE):
        return tuple(argv)
    return priority_prefix(priority, os.getpriority(os.PRIO_PROCESS, 0), NICE or "nice", IONICE or "ionice") + tuple(argv)


_WRAPPERS = {path for path in (SETPRIV, NICE, IONICE) if path}


def command_name(process: subprocess.Popen) -> str:
    """Given a started child, return the base name of the command it runs (not our setpriv/nice/ionice wrappers)."""
    args = list(process.args)
    while args and args[0] in _WRAPPERS and "--" in args:
        args = args[args.index("--") + 1:]
    return os.path.basename(str(args[0])) if args else "?"


def _grow_pipe(fd: int) -> None:
    """Given the read end of a child's stdout pipe, enlarge its buffer (Linux, up to pipe-max-size):
    a child streaming data (borg extract --stdout, restic dump) then waits less for each piece to be
    taken (a 1 GiB restore: -0.3 s)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, STREAM_PIPE_BYTES)
    except (AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass


def _collect_output(process: subprocess.Popen, on_stderr_line, on_stdout=None) -> tuple[bytes, list[str]]:
    """Given a started process, read its stdout and stderr to EOF; return (stdout, last stderr lines).

    With `on_stdout`, stdout chunks go there instead of into the returned bytes."""
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    stdout_chunks: list[bytes] = []
    pending = b""

    def emit(raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        if not line.strip():
            return
        tail.append(line)
        if on_stderr_line is not None:
            on_stderr_line(line)

    streamed = on_stdout is not None
    with selectors.DefaultSelector() as selector:
        if process.stdout is not None:
            selector.register(process.stdout, selectors.EVENT_READ, "stdout")
            if on_stdout is not None:
                _grow_pipe(process.stdout.fileno())
        selector.register(process.stderr, selectors.EVENT_READ, "stderr")
        while selector.get_map():
            for key, _ in selector.select():
                # A streamed stdout is read a pipe's worth at a time: fewer, larger pieces for the
                # consumer (a restore's sparse writer), 16x fewer trips through this loop.
                data = os.read(key.fd, STREAM_PIPE_BYTES if streamed and key.data == "stdout" else 65536)
                if not data:
                    selector.unregister(key.fileobj)
                elif key.data == "stdout":
                    if on_stdout is not None:
                        on_stdout(data)
                    else:
                        stdout_chunks.append(data)
                else:
                    # Progress output may end its lines with "\r" only.
                    *lines, pending = _LINE_BREAK.split(pending + data)
                    for raw in lines:
                        emit(raw)
    if pending:
        emit(pending)
    return b"".join(stdout_chunks), list(tail)


def _stop(process: subprocess.Popen, stop_signal: int = signal.SIGTERM) -> None:
    """Given a child that must not outlive an interrupted caller, send it `stop_signal`, then SIGKILL its group."""
    if process.poll() is not None:
        return
    logger.warning("stopping %s (pid %d)", command_name(process), process.pid)
    try:
        process.send_signal(stop_signal)
        try:
            process.wait(timeout=TERMINATE_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop after %s; killing it", command_name(process),
                           signal.Signals(stop_signal).name)
    finally:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: take its helpers too
            except ProcessLookupError:
                pass
            process.wait()


_thread_scope = threading.local()


class ChildScope:
    """The children started by the threads working inside this scope, so that another thread
    (the main thread, which alone receives signals) can stop them all.

    A worker thread runs its function with `scope.call(fn, ...)`; every `run_command` it makes
    meanwhile is registered here. `stop()` sends each running child its stop signal and makes
    any later `run_command` of these threads fail at once; `kill()` SIGKILLs the process groups
    still alive. Each worker's `run_command` still reaps its own child.

    A scope made in a thread that works inside another scope (a domain's store inside a parallel
    run's scope) is that scope's inner scope: stopping or killing the outer one does the same to it,
    and one made once the outer one stopped starts stopped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._children: dict[subprocess.Popen, int] = {}
        self._stopped_groups: set[int] = set()  # process groups `stop` signalled: `kill` takes their helpers too
        self._inner: list[ChildScope] = []  # kept after they end: `kill` still takes the helpers they stopped
        self.stopped = False
        outer = getattr(_thread_scope, "scope", None)
        if outer is not None:
            outer._add_inner(self)

    def _add_inner(self, inner: "ChildScope") -> None:
        with self._lock:
            self._inner.append(inner)
            stopped = self.stopped
        if stopped:
            inner.stop()

    def call(self, fn: Callable, *args, **kwargs):
        """Given a function and its arguments, run it in this thread with this scope active; return its result."""
        previous = getattr(_thread_scope, "scope", None)
        _thread_scope.scope = self
        try:
            return fn(*args, **kwargs)
        finally:
            _thread_scope.scope = previous

    def adopt(self, process: subprocess.Popen, stop_signal: int) -> bool:
        """Register a started child; return False (not registered) if the scope is already stopped."""
        with self._lock:
            if self.stopped:
                return False
            self._children[process] = stop_signal
            return True

    def release(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._children.pop(process, None)

    def stop(self) -> None:
        """Refuse new children and send every running one its stop signal (SIGTERM, SIGINT for restic)."""
        with self._lock:
            self.stopped = True
            children = list(self._children.items())
            inner = list(self._inner)
        for scope in inner:
            scope.stop()
        for process, stop_signal in children:
            if process.poll() is None:
                logger.warning("stopping %s (pid %d)", command_name(process), process.pid)
                with self._lock:
                    self._stopped_groups.add(process.pid)
                try:
                    process.send_signal(stop_signal)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        """SIGKILL the process group of every child still registered, and of every child `stop` signalled
        (its ssh may outlive it), after `stop` and a grace period."""
        with self._lock:
            groups = {process.pid for process in self._children if process.poll() is None}
            groups |= self._stopped_groups
            inner = list(self._inner)
        for scope in inner:
            scope.kill()
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def duration_text(seconds: float) -> str:
    """Given a number of seconds, return it the way a config duration is written: 12h, 90m, 5s, 1.5s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:g}s"


@contextmanager
def stop_scope_after(scope: ChildScope, seconds: float | None) -> Iterator[threading.Event]:
    """Given a ChildScope and a time limit (None: none), yield an Event that is set once the limit passed.

    When it passes before the block ends, the scope is stopped (every child gets its stop signal,
    so borg and restic release their repository locks; later `run_command`s in the scope fail at
    once) and, TERMINATE_GRACE_SECONDS later, the process groups still running are SIGKILLed
    (an ssh waiting on a dead server). The block's own code then sees its commands fail and ends."""
    expired = threading.Event()
    if seconds is None:
        yield expired
        return
    done = threading.Event()

    def watch() -> None:
        if done.wait(seconds):
            return
        expired.set()
        logger.warning("time limit of %s passed; stopping the commands still running", duration_text(seconds))
        scope.stop()
        if not done.wait(TERMINATE_GRACE_SECONDS):
            scope.kill()

    watcher = threading.Thread(target=watch, name="kvm-borg-time-limit", daemon=True)
    watcher.start()
    try:
        yield expired
    finally:
        done.set()
        watcher.join(timeout=TERMINATE_GRACE_SECONDS)


def call_in_parallel(calls: Sequence[Callable[[], object]], on_result: Callable[[int, object], None] | None = None,
                     scope: ChildScope | None = None) -> list:
    """Given zero-argument callables, run each in its own thread inside one ChildScope; return their results in order.

    `scope` is that ChildScope (None: a new one), so a caller can also stop it on a time limit
    (`stop_scope_after`). `on_result(index, result)` runs in the calling thread as each call finishes. A call's
    exception is re-raised here once every call has ended. If the calling thread is
    interrupted while waiting (only the main thread gets signals), every child the threads
    started is stopped (their stop signal, SIGKILL after TERMINATE_GRACE_SECONDS), the calls
    are waited for, and the interrupt re-raised.

    Completion is reported through a queue, never `Thread.join`: a join interrupted by a signal
    handler's exception can mark a still running thread as ended (CPython 3.11, bpo-45274)."""
    scope = ChildScope() if scope is None else scope
    results: list = [None] * len(calls)
    errors: list = [None] * len(calls)
    finished: queue.SimpleQueue = queue.SimpleQueue()

    def work(index: int) -> None:
        try:
            results[index] = scope.call(calls[index])
        except BaseException as exc:  # re-raised in the calling thread
            errors[index] = exc
        finally:
            finished.put(index)

    for index in range(len(calls)):
        threading.Thread(target=work, args=(index,), name=f"kvm-borg-{index}", daemon=True).start()
    pending = set(range(len(calls)))
    try:
        while pending:
            try:
                index = finished.get(timeout=0.2)
            except queue.Empty:
                continue
            pending.discard(index)
            if errors[index] is None and on_result is not None:
                on_result(index, results[index])
    except BaseException:
        scope.stop()
        _wait_finished(finished, pending, TERMINATE_GRACE_SECONDS)
        scope.kill()
        _wait_finished(finished, pending, TERMINATE_GRACE_SECONDS)
        raise
    for error in errors:
        if error is not None:
            raise error
    return results


def _wait_finished(finished: "queue.SimpleQueue", pending: set, seconds: float) -> None:
    """Wait up to `seconds` for the pending calls to report; a further interrupt meanwhile does not cut the wait short."""
    deadline = time.monotonic() + seconds
    while pending and time.monotonic() < deadline:
        try:
            pending.discard(finished.get(timeout=max(0.01, min(0.2, deadline - time.monotonic()))))
        except queue.Empty:
            continue
        except BaseException:  # a second signal: the first one is re-raised by the caller
            continue
